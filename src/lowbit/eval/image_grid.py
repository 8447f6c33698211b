"""The side-by-side picture of an image model's quality: for a few inputs, the reference
output | the quantized output | their difference (absolute, amplified so that small errors
show), one row per input (matplotlib, PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from lowbit.assets.atomic import write_png_atomic
from lowbit.errors import LowbitError


def save_grid(path: Path, ref: Tensor | Sequence[Tensor], got: Tensor | Sequence[Tensor],
              title: str = "", rows: int = 4, gain: float = 10.0) -> Path:  # fmt: skip
    """Write the grid of ``rows`` images from ``ref`` and ``got`` ((N, C, H, W) in [0, 1],
    C = 1 or 3, or sequences of (C, H, W) images of any sizes, the i-th of each alike) to
    ``path`` atomically; the difference is ``gain`` x |got - ref|. Rows are as tall as the
    first image's aspect asks."""
    ref, got = list(ref), list(got)
    alike = len(ref) == len(got) and all(a.shape == b.shape for a, b in zip(ref, got, strict=True))
    if not ref or not alike or any(a.dim() != 3 or a.shape[0] not in (1, 3) for a in ref):
        raise LowbitError("grid: expected two sets of (1|3, H, W) images, alike pair by pair, "
                          f"got {[tuple(a.shape) for a in ref[:4]]} and "
                          f"{[tuple(b.shape) for b in got[:4]]}")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(rows, len(ref))
    height = 2.6 * n * ref[0].shape[-2] / ref[0].shape[-1]
    fig, axes = plt.subplots(n, 3, figsize=(7.8, max(height, 1.6)), squeeze=False)
    heads = ("reference", "quantized", f"|difference| x {gain:g}")
    for i in range(n):
        diff = ((got[i] - ref[i]).abs() * gain).clamp(0, 1)
        for j, image in enumerate((ref[i], got[i], diff)):
            ax = axes[i][j]
            pixels = image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
                      cmap="gray" if pixels.shape[-1] == 1 else None, vmin=0, vmax=1)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(heads[j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return write_png_atomic(fig, path)


__all__ = ["save_grid"]
