"""lowbit side by side with its peers, llm-compressor and auto-round, on the same token windows.

Protocol. lowbit draws the calibration windows (``--calib``, ``--calib-samples`` x
``--calib-seqlen`` tokens, seed 0) with its own API; the same token ids are written to a
safetensors file and handed to each peer, which calibrates on exactly those windows. Every
quantized model, lowbit's or a peer's, is then scored here by lowbit's evaluator against the
float model on the same evaluation windows as lowbit's tables (``--corpus``, ``--tokens`` in
windows of ``--seqlen``): perplexity, its ratio to float, KL(fp || q) per token, top-1
agreement, and the seconds the quantization itself took (loading and saving excluded).

Formats: int weights, asymmetric, in groups (W4 g64, W3 g32), weight-only, lm_head kept in
float; W8A8 is int8 per-channel weights with int8 dynamic per-token activations. Peer rows:

  gptq       llm-compressor GPTQModifier                       (each --formats)
  awq        llm-compressor AWQModifier + QuantizationModifier (each --formats)
  autoround  auto-round AutoRound, SignRound tuning            (each --formats)
  w8a8       llm-compressor QuantizationModifier, scheme W8A8  (once)

The peers pin other versions of transformers and compressed-tensors than lowbit, so they run
in their own venv (``--venv``, default .venv-peers/), created once with ``--setup``; each peer
quantizes in a subprocess (benchmarks/peers_worker.py) and saves an HF folder, which this
process loads with transformers: compressed-tensors folders dequantized on load (W8A8 keeps
its per-token activation quantization), auto-round's saved with its ``fake`` format (the
tuned weights, dequantized: its packed formats need auto-round's or GPTQ kernels to load, and
its llm_compressor export rejects asymmetric schemes). On a machine with a GPU the peers
quantize on it, as their users run them (llm-compressor finds it itself; auto-round is given
device 0); the scoring stays on the CPU. Each row is printed as soon as it is measured, so a
stopped run keeps what it printed.

    .venv/bin/python benchmarks/peers.py --setup     # once: pip installs the peers
    .venv/bin/python benchmarks/peers.py [--model smollm2-135m]
        [--lowbit w4-g64-best w3-g32-best] [--peers gptq awq autoround w8a8]
        [--formats w4-g64 w3-g32] [--gptq-dampening 0.01] [--autoround-iters 200]
        [--autoround-batch 8] [--calib-samples 128] [--calib-seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from lowbit import api
from lowbit.recipes.io import load_recipe
from protocol import add_protocol_options, start

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("peers_worker.py")
PINS = ["torch==2.13.0", "llmcompressor==0.14.0.1", "auto-round==0.15.1"]  # torch: CPU wheel
FORMATS = {"w4-g64": (4, 64), "w3-g32": (3, 32)}
PEERS = {  # row name: (package, its distribution name, what the row runs)
    "gptq": ("llm-compressor", "llmcompressor", "GPTQModifier"),
    "awq": ("llm-compressor", "llmcompressor", "AWQModifier + QuantizationModifier"),
    "autoround": ("auto-round", "auto-round", "AutoRound"),
    "w8a8": ("llm-compressor", "llmcompressor", "QuantizationModifier W8A8"),
}


def setup(venv: Path) -> None:
    """Create ``venv`` (if needed) and pip install the pinned peers into it."""
    python = venv / "bin" / "python"
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    pip = [str(python), "-m", "pip", "install"]
    steps += [[*pip, PINS[0]], [*pip, *PINS]]  # torch first: pip keeps its CPU wheel after
    for cmd in steps:
        print("+ " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    versions = peer_versions(venv)
    if not versions.get("torch", "").startswith("2.13.0"):
        sys.exit(f"{venv} has torch {versions.get('torch')}, not the 2.13.0 CPU wheel")
    print("installed: " + ", ".join(f"{k} {v}" for k, v in versions.items()))


def peer_versions(venv: Path) -> dict[str, str]:
    """The versions installed in ``venv`` (empty if it does not exist), without importing."""
    python = venv / "bin" / "python"
    if not python.exists():
        return {}
    code = ("import json; from importlib.metadata import version, PackageNotFoundError\n"
            "def v(n):\n try: return version(n)\n except PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in ['torch', 'transformers', 'llmcompressor', "
            "'compressed-tensors', 'auto-round']}))")  # fmt: skip
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return {k: v for k, v in json.loads(out.stdout).items() if v}


def run_peer(peer: str, bits: int, group: int, folder: Path, calib: Path, work: Path,
             args: argparse.Namespace) -> tuple[Path, dict] | str:  # fmt: skip
    """Quantize with ``peer`` in the peers' venv: (output folder, result) or why it failed."""
    stem = peer if peer == "w8a8" else f"{peer}-w{bits}-g{group}"
    out, result, log = (work / f"{stem}{s}" for s in ("", ".json", ".log"))
    cmd = [str(args.venv / "bin" / "python"), str(WORKER), peer, "--model", str(folder),
           "--calib", str(calib), "--out", str(out), "--result", str(result), "--bits", str(bits),
           "--group", str(group), "--dampening", str(args.gptq_dampening),
           "--iters", str(args.autoround_iters), "--batch", str(args.autoround_batch)]  # fmt: skip
    if args.autoround_compile is not None:
        cmd.append("--compile" if args.autoround_compile else "--no-compile")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        print("\n".join(lines[-20:]), file=sys.stderr, flush=True)  # the log may be temporary
        return f"failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}"
    return out, json.loads(result.read_text())


def load_peer(folder: Path) -> torch.nn.Module:
    """A peer's saved folder as a float model: compressed-tensors weights are dequantized on
    load, except with quantized activations, whose per-token quantization has to stay."""
    quant = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    kwargs = {}
    if quant.get("quant_method") == "compressed-tensors":
        groups = quant.get("config_groups", {}).values()
        activations = any(g.get("input_activations") for g in groups)
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=not activations)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def run_lowbit(model: str, recipe: str, out: Path, args: argparse.Namespace) -> dict | str:
    """``lowbit quantize``'s JSON summary, or why it failed (its stderr's last lines printed)."""
    cmd = [sys.executable, "-m", "lowbit.cli", "-q", "quantize", model, "--recipe", recipe,
           "--out", str(out), "--calib", args.calib, "--calib-samples", str(args.calib_samples),
           "--calib-seqlen", str(args.calib_seqlen), "--overwrite", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        print("\n".join(lines[-20:]), file=sys.stderr, flush=True)
        return f"failed (exit {done.returncode}): {lines[-1] if lines else 'no output'}"
    return json.loads(done.stdout)


def recipe_format(recipe: dict) -> str:
    w, a = recipe["weights"], recipe.get("activations")
    group = f"g{w['group_size']}" if w.get("granularity") == "group" else w.get("granularity")
    sym = "sym" if w.get("symmetric") else "asym"
    return f"w{w['bits']} {group} {sym}" + (f" a{a['bits']}" if a else "")


def peer_settings(peer: str, args: argparse.Namespace) -> str:
    compile_ = {None: "auto", True: "on", False: "off"}[args.autoround_compile]
    return {
        "gptq": f"dampening_frac {args.gptq_dampening}, actorder static, block_size 128",
        "awq": "duo_scaling on, n_grid 20 (defaults)",
        "autoround": f"iters {args.autoround_iters}, batch_size {args.autoround_batch}, "
        f"torch.compile {compile_}; saved as format=fake",
        "w8a8": "int8 channel weights x int8 dynamic per-token inputs",
    }[peer]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--setup", action="store_true",
                   help=f"create --venv and pip install {' '.join(PINS)}, then exit")  # fmt: skip
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-peers", help="the peers' venv")
    p.add_argument("--model", default="smollm2-135m", help="a zoo name or an HF folder")
    p.add_argument("--lowbit", nargs="*", default=["w4-g64-best", "w3-g32-best"],
                   metavar="RECIPE", help="lowbit rows: preset names or YAML recipes")  # fmt: skip
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--gptq-dampening", type=float, default=0.01,
                   help="GPTQModifier dampening_frac (its default: 0.01)")  # fmt: skip
    p.add_argument("--autoround-iters", type=int, default=200,
                   help="AutoRound tuning steps per block (its default: 200)")  # fmt: skip
    p.add_argument("--autoround-batch", type=int, default=8,
                   help="AutoRound windows per step (its default: 8)")  # fmt: skip
    p.add_argument("--autoround-compile", action=argparse.BooleanOptionalAction,
                   help="AutoRound's torch.compile (default: auto-round's own choice)")  # fmt: skip
    p.add_argument("--work", type=Path, help="keep windows, folders and logs here")
    add_protocol_options(p)
    args = p.parse_args()
    if args.setup:
        return setup(args.venv)
    for recipe in args.lowbit:
        load_recipe(recipe)  # an unknown preset fails now, not after the first rows

    args.rows = None
    src, calib, fp = start(args, {})
    versions = peer_versions(args.venv)
    print(f"calibration windows sha256 {calib.token_sha256[:12]}, the same for every row; "
          f"peers in {args.venv}: " + (", ".join(f"{k} {v}" for k, v in versions.items())
                                       or "not installed") + "\n")  # fmt: skip
    print("| tool | method | format | ppl | x fp | KL | top-1 | quantize s | settings |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|", flush=True)

    def row(tool: str, method: str, fmt: str, model: torch.nn.Module, seconds: float,
            settings: str) -> None:  # fmt: skip
        r = api.evaluate({method: model}, src.tokenizer, args.corpus, args.seqlen, args.tokens,
                         ref=src.model, progress=False)[method]  # fmt: skip
        print(f"| {tool} | {method} | {fmt} | {r.ppl:.3f} | {r.ppl / fp.ppl:.3f} | {r.kl:.4f} | "
              f"{r.top1:.3f} | {seconds:.1f} | {settings} |", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for recipe in args.lowbit:
            print(f"quantizing lowbit {recipe} ...", file=sys.stderr, flush=True)
            run = run_lowbit(args.model, recipe, work / f"lowbit-{Path(recipe).stem}", args)
            if isinstance(run, str):  # the other rows still run
                print(f"| lowbit | {Path(recipe).stem} | - | - | - | - | - | - | {run} |",
                      flush=True)  # fmt: skip
                continue
            if run["calibration"]["token_sha256"] != calib.token_sha256:
                sys.exit(f"lowbit {recipe} calibrated on other windows than the peers get")
            model = api.load(run["out"], kernels=False).model
            algorithm = run["recipe"].get("algorithm") or "rtn"
            row("lowbit", Path(recipe).stem, recipe_format(run["recipe"]), model,
                run["seconds"], f"algorithm {algorithm}")  # fmt: skip
            del model

        windows = work / "calib.safetensors"
        save_file({"windows": calib.windows.contiguous()}, str(windows))
        jobs = [(peer, *FORMATS[fmt]) for fmt in args.formats for peer in args.peers
                if peer != "w8a8"] + [("w8a8", 8, -1)] * ("w8a8" in args.peers)  # fmt: skip
        for peer, bits, group in jobs:
            package, dist, method = PEERS[peer]
            fmt = "w8 channel sym a8" if peer == "w8a8" else f"w{bits} g{group} asym"
            if src.folder is None:
                reason = f"{args.model} has no HF folder to hand to {package}"
            elif dist not in versions:
                reason = f"{package} not installed: run benchmarks/peers.py --setup"
            else:
                print(f"quantizing {package} {method} {fmt} ...", file=sys.stderr, flush=True)
                got = run_peer(peer, bits, group, src.folder, windows, work, args)
                if isinstance(got, tuple):
                    (out, result), settings = got, peer_settings(peer, args)
                    model = load_peer(out)
                    row(package, method, fmt, model, result["seconds"], settings)
                    del model
                    continue
                reason = got
            print(f"| {package} | {method} | {fmt} | - | - | - | - | - | {reason} |", flush=True)


if __name__ == "__main__":
    main()
