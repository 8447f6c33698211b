"""A small DDPM trained on scikit-learn's 8x8 handwritten digits (upscaled to 16x16), with its
sampler as the module lowbit quantizes.

No pretrained diffusion weights ship in any package reachable offline, so this model is trained
once on the CPU (diffusers' ``UNet2DModel`` and ``DDPMScheduler``, a few minutes on two cores,
seeded) and cached as safetensors; later loads read the cache. The module maps noise
(N, 1, 16, 16) to digits in [-1, 1] by deterministic DDIM sampling (``STEPS`` steps of the
1,000 training timesteps): each of its layers runs once per step, on inputs whose range
depends on the timestep, which is what per-timestep activation ranges are for
(:func:`lowbit.nn.select_step` tells the layers where the sampler is).
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.assets import cache_dir
from lowbit.assets.atomic import atomic_file
from lowbit.errors import LowbitError
from lowbit.nn.steps import select_step

SIZE = 16
STEPS = 25  # DDIM sampling steps
TRAIN_TIMESTEPS = 1000
# the UNet (diffusers UNet2DModel keywords) and its training run; the cache is keyed by both
UNET = {"sample_size": SIZE, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
        "block_out_channels": [32, 64, 64], "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}  # fmt: skip
TRAINING = {"steps": 2000, "batch": 64, "lr": 2e-3, "seed": 0, "holdout": 297}

log = logging.getLogger(__name__)


class DigitsDDPM(nn.Module):
    """(N, 1, 16, 16) Gaussian noise -> (N, 1, 16, 16) digits in [-1, 1] (DDIM, eta 0)."""

    quantized_whole = True  # one unit, not block by block (see lowbit.models.images)
    repeats_layers = True  # each layer runs once per sampling step within one forward

    def __init__(self, unet: dict | None = None, steps: int = STEPS) -> None:
        super().__init__()
        from diffusers import DDIMScheduler, UNet2DModel

        self.unet = UNet2DModel(**(unet or UNET))
        self.scheduler = DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
        self.scheduler.set_timesteps(steps)

    def forward(self, noise: Tensor) -> Tensor:
        size = self.unet.config.sample_size
        if noise.dim() != 4 or noise.shape[1:] != (1, size, size):
            raise LowbitError(f"ddpm-digits takes noise (N, 1, {size}, {size}), got "
                              f"{tuple(noise.shape)}")  # fmt: skip
        x = noise
        for t in self.scheduler.timesteps:
            select_step(self.unet, int(t) / TRAIN_TIMESTEPS)
            eps = self.unet(x, t).sample
            x = self.scheduler.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)


def noise(count: int, seed: int) -> Tensor:
    """``count`` seeded standard-normal starting points (N, 1, 16, 16) of the sampler."""
    return torch.randn(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def digits(holdout: int = TRAINING["holdout"]) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 digits as (N, 1, 16, 16) in [-1, 1] (bilinear 2x), split into the
    training images and the last ``holdout`` (never trained on)."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float()[:, None] / 16.0  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    return images[:-holdout], images[-holdout:]


def train_digits_ddpm(model: DigitsDDPM, steps: int, batch: int, lr: float, seed: int,
                      holdout: int, progress: bool = True) -> DigitsDDPM:  # fmt: skip
    """Train ``model``'s UNet to predict the noise added at uniformly drawn timesteps (the DDPM
    objective, linear betas), AdamW with a cosine schedule, on the training digits."""
    from diffusers import DDPMScheduler

    train, _ = digits(holdout)
    noising = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # anything on torch's global generator (the draws above use gen)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    model.unet.train()
    bar = tqdm(range(steps), desc="train ddpm-digits (once)", unit="step", disable=not progress)
    for _ in bar:
        x0 = train[torch.randint(0, len(train), (batch,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, TRAIN_TIMESTEPS, (batch,), generator=gen)
        loss = F.mse_loss(model.unet(noising.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def _key() -> str:
    import diffusers

    spec = {"unet": UNET, "training": TRAINING, "diffusers": diffusers.__version__.split(".")[:2]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ddpm_digits(progress: bool = True) -> DigitsDDPM:
    """The trained model: from the cache's ``images/ddpm-digits-KEY.safetensors``, or trained
    here once (seeded; a few minutes on two cores) and cached, written atomically."""
    cached = cache_dir() / "images" / f"ddpm-digits-{_key()}.safetensors"
    torch.manual_seed(TRAINING["seed"])
    model = DigitsDDPM()
    if not cached.is_file():
        log.info("ddpm-digits: no pretrained weights exist; training it once on the CPU (%d "
                 "steps) and caching it at %s", TRAINING["steps"], cached)  # fmt: skip
        train_digits_ddpm(model, progress=progress, **TRAINING)
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cached) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    model.load_state_dict(load_file(str(cached)))
    return model.eval()


__all__ = ["SIZE", "STEPS", "DigitsDDPM", "ddpm_digits", "digits", "noise", "train_digits_ddpm"]
