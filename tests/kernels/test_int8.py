"""W8A8: lowbit's int8 kernel and fbgemm's against the plain-PyTorch reference of each grid."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import int8
from lowbit.kernels.build import native_ops

needs_native = pytest.mark.skipif(not native_ops(), reason="lowbit's CPU kernels not built here")


def random_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return codes, torch.rand(n, generator=g) * 0.01 + 1e-4


def varied_input(*shape: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x * torch.linspace(0.1, 10, shape[-1])  # rows and channels of varied size


@pytest.mark.parametrize(("n", "k"), [(8, 4), (37, 101), (16, 576), (9, 1030)])
def test_panels_round_trip(n, k):
    codes, _ = random_weight(n, k)
    panels = int8.pack_panels(codes)
    assert panels.shape == (-(-n // 8), -(-k // 4), 32)
    assert torch.equal(int8.unpack_panels(panels, n, k), codes)


@needs_native
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 130])
@pytest.mark.parametrize(("n", "k"), [(8, 64), (37, 101), (24, 576), (17, 2100)])
def test_kernel_equals_reference_bit_for_bit(m, n, k, monkeypatch):
    monkeypatch.setattr(int8, "act_grid", lambda: "token")
    codes, scale = random_weight(n, k, seed=m)
    fast = int8.prepare_int8(codes, scale)
    assert fast.panels is not None and fast.codes is None  # only the kernel's copy is kept
    x = varied_input(2, m, k, seed=m + k)
    x[0, 0] = 0.0  # a row of zeros: scale 0, codes 0
    got = int8.int8_linear(x, fast)
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, None, k), "token")
    assert torch.equal(got, ref)
    assert torch.equal(int8.int8_weight_codes(fast), codes)


@needs_native
def test_full_range_codes_do_not_saturate(monkeypatch):
    """-128 weights against ±127 activations: vpmaddubsw's pair sums stay below 2^15."""
    monkeypatch.setattr(int8, "act_grid", lambda: "token")
    k = 256
    codes = torch.full((16, k), -128, dtype=torch.int8)
    codes[8:] = 127
    x = torch.ones(3, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    y = int8.int8_linear(x, int8.prepare_int8(codes, torch.ones(16)))
    exact = (torch.round(x * 127) @ codes.float().T) * (torch.ones(()) / 127.0)  # sums < 2^24
    assert torch.equal(y, exact)


def test_reference_sums_are_exact_beyond_float32s_integers():
    """K = 3000 full-range products exceed float32's exact integers: the reference still sums
    exactly (compared with int64 arithmetic)."""
    k = 3000
    codes = torch.full((4, k), 127, dtype=torch.int8)
    codes[1] = -128
    codes[2, ::3] = -128
    x = torch.ones(2, k)
    x[1, 1::2] = -1
    got = int8.int8_linear_reference(x, int8.Int8Weight(codes, torch.ones(4), None, k), "token")
    q, sx = int8.quantize_tokens(x)
    exact = (q.long() @ codes.long().T).double() * sx.double()
    assert torch.equal(got, exact.float())


needs_vnni_fbgemm = pytest.mark.skipif(
    not (int8.fbgemm_available() and int8.has_avx512_vnni()),
    reason="fbgemm's 8-bit path runs only with AVX-512 VNNI (this CPU takes lowbit's kernel)",
)


@needs_vnni_fbgemm
@pytest.mark.parametrize("m", [1, 3, 16, 130])
@pytest.mark.parametrize(("n", "k"), [(8, 64), (37, 100), (96, 576)])
def test_fbgemm_matches_its_reference(m, n, k):
    codes, scale = random_weight(n, k, seed=m)
    codes = codes.clamp(min=-127)
    fast = int8.prepare_int8(codes, scale)
    assert fast.packed is not None and fast.codes is None  # only fbgemm's copy is kept
    assert torch.equal(int8.int8_weight_codes(fast), codes)
    x = varied_input(2, m, k, seed=m + k)
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, None, k), "fbgemm")
    got = int8.int8_linear(x, fast)
    # the same grid; fbgemm picks its step in double precision, so a code may flip at a rounding
    # tie (one flip ~1e-4); a different grid shows as ~4e-3, the quantization error as ~2e-2
    assert (got - ref).norm() / ref.norm() < 1e-3


@pytest.mark.parametrize("grid", ["token", "fbgemm"])
def test_both_grids_are_close_to_float_linear(grid):
    codes, scale = random_weight(32, 256)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    w = codes.float() * scale.unsqueeze(1)
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, None, 256), grid)
    exact = F.linear(x, w)
    assert (ref - exact).norm() / exact.norm() < 0.01  # 8-bit per-token activations


def test_forcing_avx2_picks_the_token_grid(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avx2")
    assert not int8.has_avx512_vnni()


@pytest.mark.parametrize("grid", ["token", "fbgemm"])
def test_per_token_scaling_protects_small_rows(grid):
    """A tiny row next to a huge one keeps its precision (one range per token, not per batch)."""
    codes, scale = random_weight(16, 128)
    w = codes.float() * scale.unsqueeze(1)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    x[1] *= 1e-4
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, None, 128), grid)
    small = F.linear(x[1:], w)
    assert (ref[1:] - small).norm() / small.norm() < 0.02


def test_without_native_kernels_the_reference_runs(monkeypatch):
    monkeypatch.setattr(int8, "act_grid", lambda: "token")
    monkeypatch.setattr(int8, "native_ops", lambda: False)
    codes, scale = random_weight(8, 64)
    weight = int8.prepare_int8(codes, scale)
    assert weight.panels is None and weight.packed is None
    x = torch.randn(3, 64)
    assert torch.equal(int8.int8_linear(x, weight), int8.int8_linear_reference(x, weight))


@needs_native
def test_empty_nan_and_tiny_rows_match_the_reference(monkeypatch):
    """No rows; a row with a NaN or an infinity (its outputs are NaN, the others untouched);
    a row too small for 127/absmax to be finite (its outputs are 0)."""
    monkeypatch.setattr(int8, "act_grid", lambda: "token")
    codes, scale = random_weight(13, 37)
    fast, slow = int8.prepare_int8(codes, scale), int8.Int8Weight(codes, scale, None, 37)
    assert int8.int8_linear(torch.randn(0, 37), fast).shape == (0, 13)
    x = varied_input(5, 37)
    x[1, 3], x[2, 30], x[3] = float("nan"), float("inf"), 1e-38
    got, ref = int8.int8_linear(x, fast), int8.int8_linear_reference(x, slow)
    assert got[1:3].isnan().all() and ref[1:3].isnan().all()
    assert torch.equal(got[3], torch.zeros(13)) and torch.equal(ref[3], torch.zeros(13))
    assert torch.equal(got[[0, 4]], ref[[0, 4]])
