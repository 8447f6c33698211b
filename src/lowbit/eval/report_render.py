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


def report_markdown(rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    """The report as Markdown: what was measured and how, then one row per variant (speeds
    also as ratios to the ``fp32`` variant's, measured in the same alternating run)."""
    rows = [_with_ratios(row, next((r for r in rows if r["variant"] == "fp32"), None))
            for row in rows]  # fmt: skip
    table = format_table(
        [title for _, title in COLUMNS],
        [[_cell(row.get(key)) for key, _ in COLUMNS] for row in rows],
        markdown=True,
    )
    lines = [f"# lowbit report: {context['model']}", "", *context["protocol"], "", table, ""]
    if context.get("notes"):
        lines += [f"- {note}" for note in context["notes"]] + [""]
    lines += ["![quality vs size](quality_vs_size.png)", "", "![speed vs size](speed_vs_size.png)"]
    return "\n".join(lines) + "\n"


def _with_ratios(row: dict[str, Any], fp32: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(row)
    for key in ("prefill", "decode"):
        ours, ref = row.get(f"{key}_tps"), fp32 and fp32.get(f"{key}_tps")
        out[f"{key}_x"] = f"{ours / ref:.2f}" if ours and ref else None
    fraction = row.get("bound_fraction")
    out["bound_pct"] = None if fraction is None else f"{100 * fraction:.0f}%"
    return out


def _cell(value: Any) -> Any:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return round(value, 4) if abs(value) < 10 else round(value, 1)
    return value


def write_plots(rows: list[dict[str, Any]], folder: Path, title: str) -> list[Path]:
    """quality_vs_size.png and speed_vs_size.png in ``folder`` (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = {
        "quality_vs_size.png": [("ppl", "perplexity (lower is better)"),
                                ("kl", "KL(fp || q) per token (lower is better)")],
        "speed_vs_size.png": [("decode_tps", "decode tokens/s (batch 1)"),
                              ("prefill_tps", "prefill tokens/s")],
    }  # fmt: skip
    for name, metrics in panels.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(11, 4.2))
        for ax, (key, label) in zip(axes, metrics, strict=True):
            points = [
                (r["weight_mb"], r[key], r["variant"]) for r in rows if r.get(key) is not None
            ]
            for x, y, text in points:
                ax.scatter(x, y, s=36)
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
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
