"""The comparison report's Markdown table and its two plots (quality vs size, speed vs size)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lowbit.assets.atomic import atomic_file
from lowbit.eval.table import format_table

log = logging.getLogger(__name__)

COLUMNS = [
    ("variant", "variant"),
    ("disk_mb", "disk MB"),
    ("weight_mb", "weights in RAM MB"),
    ("peak_rss_mb", "peak RSS MB"),
    ("prefill_tps", "prefill tok/s"),
    ("prefill_x", "prefill × fp32"),
    ("decode_tps", "decode tok/s"),
    ("decode_x", "decode × fp32"),
    ("bound_pct", "decode % of bandwidth limit"),
    ("ppl", "ppl"),
    ("kl", "KL vs fp"),
    ("top1", "top-1 vs fp"),
    ("joules_per_token", "J/token"),
]
# plot file -> its panels (row key, axis label), against weights in RAM
PANELS = {
    "quality_vs_size.png": [("ppl", "perplexity (lower is better)"),
                            ("kl", "KL(fp || q) per token (lower is better)")],
    "speed_vs_size.png": [("decode_tps", "decode tokens/s (batch 1)"),
                          ("prefill_tps", "prefill tokens/s")],
}  # fmt: skip
IMAGE_COLUMNS = [
    ("variant", "variant"),
    ("disk_mb", "disk MB"),
    ("weight_mb", "weights in RAM MB"),
    ("psnr", "PSNR vs truth dB"),
    ("ssim", "SSIM vs truth"),
    ("psnr_ref", "PSNR vs fp32 dB"),
    ("ssim_ref", "SSIM vs fp32"),
    ("images_per_s", "images/s batch 1"),
    ("images_x", "× fp32"),
    ("ms_per_image", "ms/image"),
    ("images_per_s_batch16", "images/s batch 16"),
]
IMAGE_PANELS = {
    "quality_vs_size.png": [("psnr", "PSNR vs ground truth dB (higher is better)"),
                            ("psnr_ref", "PSNR vs fp32 dB (higher is better)")],
    "speed_vs_size.png": [("images_per_s", "images/s (batch 1)")],
}  # fmt: skip


def report_markdown(rows: list[dict[str, Any]], context: dict[str, Any],
                    columns: list[tuple[str, str]] = COLUMNS,
                    panels: dict[str, list] = PANELS) -> str:  # fmt: skip
    """The report as Markdown: what was measured and how, then one row per variant (speeds
    also as ratios to the ``fp32`` variant's, measured in the same run), then the plots."""
    rows = [_with_ratios(row, next((r for r in rows if r["variant"] == "fp32"), None))
            for row in rows]  # fmt: skip
    columns = [(key, title) for key, title in columns
               if key == "variant" or any(row.get(key) is not None for row in rows)]  # fmt: skip
    table = format_table(
        [title for _, title in columns],
        [[_cell(row.get(key)) for key, _ in columns] for row in rows],
        markdown=True,
    )
    lines = [f"# lowbit report: {context['model']}", "", *context["protocol"], "", table, ""]
    if context.get("notes"):
        lines += [f"- {note}" for note in context["notes"]] + [""]
    plots = [f"![{name[:-4].replace('_', ' ')}]({name})" for name in panels]
    lines += [line for plot in plots for line in (plot, "")][:-1]
    return "\n".join(lines) + "\n"


def _with_ratios(row: dict[str, Any], fp32: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(row)
    for key, ratio in (("prefill_tps", "prefill_x"), ("decode_tps", "decode_x"),
                       ("images_per_s", "images_x")):  # fmt: skip
        ours, ref = row.get(key), fp32 and fp32.get(key)
        out[ratio] = f"{ours / ref:.2f}" if ours and ref else None
    fraction = row.get("bound_fraction")
    out["bound_pct"] = None if fraction is None else f"{100 * fraction:.0f}%"
    return out


def _cell(value: Any) -> Any:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return round(value, 4) if abs(value) < 10 else round(value, 2 if abs(value) < 100 else 1)
    return value


def write_plots(rows: list[dict[str, Any]], folder: Path, title: str,
                panels: dict[str, list] = PANELS) -> list[Path]:  # fmt: skip
    """One PNG per entry of ``panels`` in ``folder`` (matplotlib, no display): each panel a
    row key against weights in RAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, metrics in panels.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2),
                                 squeeze=False)  # fmt: skip
        for ax, (key, label) in zip(axes[0], metrics, strict=True):
            points = [
                (r["weight_mb"], r[key], r["variant"]) for r in rows if r.get(key) is not None
            ]
            for x, y, text in points:
                ax.scatter(x, y, s=36)
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlim(0, 1.1 * max(r["weight_mb"] for r in rows))  # every panel, one scale
            ax.set_xlabel("weights in RAM (MB)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        with atomic_file(folder / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(folder / name)
    return written
