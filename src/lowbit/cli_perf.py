"""``lowbit bench`` and ``lowbit report``: the speed, memory and comparison commands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.cli_args import add_attention_options, apply_attention, check_window, positive
from lowbit.errors import LowbitError
from lowbit.json_out import json_text

_BENCH_EPILOG = """\
examples:
  lowbit bench out/w4 --ref smollm2-135m
  lowbit quantize tinyllama-1.1b-random --recipe w4-rtn-g64 --out out/tl-w4
  lowbit bench out/tl-w4 --ref tinyllama-1.1b-random --threads 2 --json

Runs alternate between the models (A, B, A, B, ...) and each figure is the median over runs, so
a busy machine slows both alike; set the thread count with --threads and keep other heavy jobs
off the machine. Leave OMP_WAIT_POLICY unset (or ACTIVE) when timing: PASSIVE puts OpenMP's
threads to sleep between the many small parallel regions of a decode step and a prompt, which
slowed W4 decode and W8A8 prefill on the VMs measured (see the README).
`tinyllama-1.1b-random` has TinyLlama-1.1B's shape with random weights: its speed and memory
are real, its text is noise.
"""


def add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench", parents=[common], help="prefill/decode speed, memory and energy (vs --ref)",
        description="Time MODEL as a user runs it: prefill tokens/s on a --prompt-tokens prompt, "
        "greedy decode tokens/s at batch 1 to --new-tokens tokens, time to first token, weight "
        "bytes in RAM, peak RSS (measured alone in a child process), energy per token where "
        "RAPL/NVML counters are readable, and the decode limit set by this machine's measured "
        "memory bandwidth. With --ref, both models alternate and the ratios are reported.",
        epilog=_BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL|DIR")
    p.add_argument("--ref", metavar="MODEL", help="reference model to compare against")
    _speed_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_attention_options(p)  # MODEL's cache (not --ref's); the peak-RSS probe runs without
    p.set_defaults(func=cmd_bench)


def _speed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=positive, default=512, help="prompt length (512)")
    p.add_argument("--new-tokens", type=positive, default=128, help="tokens to generate (128)")
    p.add_argument("--repeats", type=positive, default=3, help="timed runs per model (3)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")


def cmd_bench(args: argparse.Namespace) -> int:
    from lowbit import api
    from lowbit.cli_image import text_only

    text_only("bench", args.model, *([args.ref] if args.ref else []))

    if args.new_tokens < 2:
        raise LowbitError("--new-tokens must be at least 2 (the first token ends the prefill)")
    sources = {args.model: args.model}
    if args.ref:
        if args.ref == args.model:
            raise LowbitError("--ref names the model itself; compare with another model")
        sources[args.ref] = args.ref
    from lowbit.eval.bench import bench_models

    models = {name: api.load_model(src).model for name, src in sources.items()}
    apply_attention(models[args.model], args)  # --kv-bits: MODEL's cache rounded
    results, machine = bench_models(models, None if args.no_rss else sources, args.prompt_tokens,
                                    args.new_tokens, args.repeats, not args.quiet)  # fmt: skip
    out = bench_summary(results, args.model, args.ref, machine)
    print(json_text(out, indent=1) if args.json else render_bench(results, out, machine))
    return 0


def bench_summary(results: dict, name: str, ref: str | None, machine: dict) -> dict[str, Any]:
    from lowbit.eval.bench import speedups

    out = results[name].to_dict()
    out["machine"] = machine
    if ref:
        out["ref"] = results[ref].to_dict()
        out |= speedups(results[name], results[ref])
    return out


def render_bench(results: dict, summary: dict, machine: dict) -> str:
    from lowbit.eval import format_table

    first = next(iter(results.values())).speed.runs[0]
    lines = [
        f"prompt {first.prompt_tokens} tokens, {first.new_tokens} new tokens (greedy, batch 1), "
        f"{len(next(iter(results.values())).speed.runs)} alternating runs, medians; "
        f"{machine['torch_threads']} threads ({machine['cpu_capability']}, OMP_WAIT_POLICY="
        f"{machine['omp_wait_policy']}, LOWBIT_SPIN_US={machine['lowbit_spin_us']}, decode "
        f"threads: {machine.get('decode_threads', 'not recorded')}, kernels: "
        f"{machine.get('kernels', 'not recorded')}, rows of 8-bit inputs: "
        f"{machine.get('kernel_rows', 'not recorded')}); "
        f"read bandwidth {machine['bandwidth_gbs']:.1f} GB/s",
        "",
    ]
    header = ["model", "prefill tok/s", "decode tok/s", "TTFT s", "weights MB", "peak RSS MB",
              "KV KiB/token", "decode bound tok/s", "of bound", "J/token"]  # fmt: skip
    rows = []
    for name, r in results.items():
        j = r.speed.joules_per_token
        rows.append([name, round(r.speed.prefill_tps, 1), round(r.speed.decode_tps, 2),
                     round(r.speed.ttft_s, 3), r.weight_bytes / 1e6,
                     None if r.peak_rss_mb is None else round(r.peak_rss_mb),
                     _kib(r.speed.kv_bytes_per_token), round(r.bound_decode_tps, 1),
                     f"{100 * r.bound_fraction:.0f}%",
                     "n/a" if j is None else round(j, 3)])  # fmt: skip
    lines.append(format_table(header, rows))
    if "speedup_decode" in summary:
        s = summary
        lines.append(
            f"\nvs {s['ref']['model']}: decode x{s['speedup_decode']:.2f}, prefill "
            f"x{s['speedup_prefill']:.2f}, weight memory x{s['weight_memory_ratio']:.3f}"
            + (f", KV cache x{s['kv_memory_ratio']:.3f}" if "kv_memory_ratio" in s else "")
        )
    return "\n".join(lines)


def _kib(count: int | None) -> float | str:
    return "n/a" if count is None else round(count / 1024, 2)


def add_report(sub: Any, common: argparse.ArgumentParser) -> None:
    from lowbit.report import DEFAULT_VARIANTS
    from lowbit.report_image import DEFAULT_IMAGE_VARIANTS

    p = sub.add_parser(
        "report", parents=[common], help="variants of one model side by side (Markdown + plots)",
        description="Quantize MODEL with each recipe in --variants, save each as a lowbit folder "
        "under OUT/variants/, load them back on the fast kernels, and compare them with fp32 "
        "on one table: size on disk, weights in RAM, peak RSS, prefill and decode speed, "
        "perplexity, KL and top-1 against fp32, energy where readable. Writes OUT/report.md, "
        "OUT/report.json, OUT/quality_vs_size.png and OUT/speed_vs_size.png.",
        epilog="example: lowbit report smollm2-135m --out out/report "
        f"--variants {' '.join(DEFAULT_VARIANTS)}",
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="fp32 and/or recipes (presets or YAML files); default: "
                   f"{' '.join(DEFAULT_VARIANTS)} (an image model: "
                   f"{' '.join(DEFAULT_IMAGE_VARIANTS)})")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--calib", help="calibration corpus for calibrated recipes (default bbc)")
    p.add_argument("--calib-samples", type=positive, default=128, help="windows (128)")
    p.add_argument("--calib-seqlen", type=positive, default=512, help="tokens per window (512)")
    p.add_argument("--corpus", default="wiki", help="evaluation corpus (wiki)")
    p.add_argument("--seqlen", type=positive, default=2048, help="evaluation window (2048)")
    p.add_argument("--tokens", type=positive, default=16384, help="evaluation tokens (16384)")
    p.add_argument("--no-quality", action="store_true", help="skip ppl / KL / top-1")
    _speed_options(p)
    g = p.add_argument_group(
        "image models",
        "an image model's report scores each variant on its built-in inputs (or --images) "
        "against the ground truth and fp32's outputs, times it, and saves fp32 | variant | "
        "difference grids beside report.md",
    )  # fmt: skip
    g.add_argument(
        "--calib-images",
        metavar="DIR",
        help="calibrate on crops of these images instead of the model's own inputs",
    )
    g.add_argument("--images", metavar="PATH",
                   help="super-resolution models: score on these images (as `lowbit eval "
                   "--images`)")  # fmt: skip
    g.add_argument(
        "--crop",
        metavar="N",
        type=int,
        default=None,
        help="with --images: each image's centre N x N pixels (512; 0: whole)",
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from lowbit.cli_image import image_entry
    from lowbit.report import DEFAULT_VARIANTS, ReportOptions, build_report

    entry = image_entry(args.model)
    if entry is not None:
        return _image_report(args, entry)
    for flag, value in (("--calib-images", args.calib_images), ("--images", args.images),
                        ("--crop", args.crop)):  # fmt: skip
        if value is not None:
            raise LowbitError(f"{flag} is for image models; {args.model} is a language model")
    args.calib = args.calib or "bbc"
    args.variants = args.variants or DEFAULT_VARIANTS

    if args.new_tokens < 2:
        raise LowbitError("--new-tokens must be at least 2 (the first token ends the prefill)")
    if not args.no_quality:
        check_window(args.tokens, args.seqlen)
    options = ReportOptions(
        calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
        corpus=args.corpus, seqlen=args.seqlen, tokens=args.tokens,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
        quality=not args.no_quality, rss=not args.no_rss,
    )  # fmt: skip
    data = build_report(args.model, args.variants, args.out, options, args.overwrite,
                        progress=not args.quiet)  # fmt: skip
    from lowbit.eval.report_render import report_markdown

    print(report_markdown(data["rows"], data), end="")
    print(f"\nwritten to {args.out}/report.md (+ report.json, quality_vs_size.png, "
          "speed_vs_size.png)")  # fmt: skip
    return 0


def _image_report(args: argparse.Namespace, entry: Any) -> int:
    from lowbit.cli_image import image_crop
    from lowbit.eval.report_render import IMAGE_COLUMNS, IMAGE_PANELS, report_markdown
    from lowbit.report_image import DEFAULT_IMAGE_VARIANTS, ImageReportOptions, build_image_report

    if args.model != entry.name:
        raise LowbitError(f"{args.model} is already quantized; report on the float model "
                          f"({entry.name})")  # fmt: skip
    if args.calib is not None:
        raise LowbitError(f"--calib names a text corpus; {entry.name} is an image model (give "
                          f"your images with --calib-images)")  # fmt: skip
    options = ImageReportOptions(args.calib_images, args.images,
                                 image_crop(args.crop, args.images))  # fmt: skip
    data = build_image_report(entry, args.variants or DEFAULT_IMAGE_VARIANTS, args.out, options,
                              args.overwrite, progress=not args.quiet)  # fmt: skip
    print(report_markdown(data["rows"], data, IMAGE_COLUMNS, IMAGE_PANELS), end="")
    print(f"\nwritten to {args.out}/report.md (+ report.json, the plots and a grid per "
          f"variant)")  # fmt: skip
    return 0
