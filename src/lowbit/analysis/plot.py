"""The sensitivity plot: damage (KL, or output MSE) per layer for each candidate format
(matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

from lowbit.analysis.sensitivity import Sensitivity
from lowbit.assets.atomic import write_png_atomic


def plot_sensitivity(sens: Sensitivity, path: Path, title: str = "") -> Path:
    """Write the plot to ``path`` atomically (temporary file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(sens.layers)
    fig, ax = plt.subplots(figsize=(max(8, len(layers) / 12), 4.5))
    for cand in sens.candidates:
        ys = [max(sens.damage[n][cand], 1e-7) for n in layers]
        ax.plot(range(len(layers)), ys, marker=".", linewidth=0.8, label=cand)
    ax.set_yscale("log")
    ax.set_xlabel("layer (model order)")
    image = sens.metric == "mse"
    ax.set_ylabel(f"{'output MSE' if image else 'KL(fp || q)'}, this layer alone")
    rho = sens.rank_correlation()
    what = "images" if image else "tokens"
    ax.set_title(f"{title} sensitivity ({sens.tokens} calibration {what}); "
                 f"proxy rank correlation {rho:.2f}".strip())  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return write_png_atomic(fig, path)
