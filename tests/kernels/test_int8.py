"""W8A8: fbgemm's dynamic int8 linear against the plain-PyTorch reference of the same arithmetic."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import int8


def random_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return codes, torch.rand(n, generator=g) * 0.01 + 1e-4


needs_fbgemm = pytest.mark.skipif(not int8.fbgemm_available(), reason="no fbgemm engine")


@needs_fbgemm
@pytest.mark.parametrize("levels", [int8.ACT_LEVELS_7BIT, int8.ACT_LEVELS_8BIT])
@pytest.mark.parametrize("m", [1, 3, 16, 130])
@pytest.mark.parametrize("n,k", [(8, 64), (37, 100), (96, 576)])
def test_fbgemm_matches_reference(m, n, k, levels, monkeypatch):
    if levels == int8.ACT_LEVELS_8BIT and not int8._has_avx512_vnni():
        pytest.skip("8-bit activation codes saturate fbgemm's AVX2 kernel (no VNNI here)")
    monkeypatch.setattr(int8, "act_levels", lambda: levels)
    codes, scale = random_weight(n, k, seed=m)
    fast, slow = int8.prepare_int8(codes, scale), int8.Int8Weight(codes, scale, None, k)
    assert fast.packed is not None and fast.codes is None  # only fbgemm's copy is kept
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(m + k))
    x = x * torch.linspace(0.1, 10, k)  # rows and channels of varied size
    ref, got = int8.int8_linear_reference(x, slow), int8.int8_linear(x, fast)
    # the same grid; fbgemm picks its step in double precision, so a code may flip at a rounding
    # tie (one flip ~1e-4); a different grid shows as ~4e-3, the quantization error as ~2e-2
    err = (got - ref).norm() / ref.norm()
    assert err < 1e-3, err


@needs_fbgemm
def test_codes_come_back_from_fbgemms_copy():
    codes, scale = random_weight(16, 64)
    assert torch.equal(int8.int8_weight_codes(int8.prepare_int8(codes, scale)), codes)


@pytest.mark.parametrize(("levels", "bound"), [(127, 0.02), (255, 0.01)])
def test_reference_is_close_to_float_linear(levels, bound):
    codes, scale = random_weight(32, 256)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    w = codes.float() * scale.unsqueeze(1)
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, None, 256), levels)
    exact = F.linear(x, w)
    assert (ref - exact).norm() / exact.norm() < bound  # per-token activations, 7 or 8 bits


def test_machine_grid_is_7_bit_when_avx2_is_forced(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avx2")
    assert not int8._has_avx512_vnni()


def test_per_token_scaling_protects_small_rows():
    """A tiny row next to a huge one keeps its precision (one range per token, not per batch)."""
    codes, scale = random_weight(16, 128)
    w = codes.float() * scale.unsqueeze(1)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    x[1] *= 1e-4
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, None, 128))
    small = F.linear(x[1:], w)
    assert (ref[1:] - small).norm() / small.norm() < 0.02


def test_without_fbgemm_the_reference_runs(monkeypatch):
    monkeypatch.setattr(int8, "fbgemm_available", lambda: False)
    codes, scale = random_weight(8, 64)
    weight = int8.prepare_int8(codes, scale)
    assert weight.packed is None
    x = torch.randn(3, 64)
    assert torch.equal(int8.int8_linear(x, weight), int8.int8_linear_reference(x, weight))
