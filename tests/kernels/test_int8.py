"""W8A8: lowbit's two int8 kernels (its own panels, oneDNN's matmul) against the reference."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import int8
from lowbit.kernels.build import native_ops

needs_native = pytest.mark.skipif(not native_ops(), reason="lowbit's CPU kernels not built here")
# mm-avxvnni: the mm path under LOWBIT_KERNEL_ISA=avxvnni, its GEMV (up to 4 rows) on AVX-VNNI
KERNELS = ["panels", "mm", "mm-avxvnni"]


def random_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return codes, torch.rand(n, generator=g) * 0.01 + 1e-4


def kernel_weight(kernel: str, codes: torch.Tensor, scale: torch.Tensor,
                  monkeypatch: pytest.MonkeyPatch) -> int8.Int8Weight:  # fmt: skip
    """``codes`` held as ``kernel`` holds them (skips where that kernel cannot run)."""
    if not native_ops():
        pytest.skip("lowbit's CPU kernels not built here")
    k = codes.shape[1]
    if kernel == "panels":
        return int8.Int8Weight(None, scale, k, int8.pack_panels(codes))
    if not int8.onednn_int8_exact():
        pytest.skip("oneDNN's int8 matmul is exact only with VNNI or AMX")
    if kernel == "mm-avxvnni":
        if "avx_vnni" not in int8.cpu_flags():
            pytest.skip("the CPU has no AVX-VNNI")
        monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avxvnni")  # read by the kernel at every call
    return int8.Int8Weight(codes, scale, k, mm=True)


def varied_input(*shape: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x * torch.linspace(0.1, 10, shape[-1])  # rows and channels of varied size


@pytest.mark.parametrize(("n", "k"), [(8, 4), (37, 101), (16, 576), (9, 1030)])
def test_panels_round_trip(n, k):
    codes, _ = random_weight(n, k)
    panels = int8.pack_panels(codes)
    assert panels.shape == (-(-n // 8), -(-k // 4) + 1, 32)
    assert torch.equal(int8.unpack_panels(panels, n, k), codes)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 130])
@pytest.mark.parametrize(("n", "k"), [(8, 64), (37, 101), (24, 576), (17, 2100)])
def test_kernel_equals_reference_bit_for_bit(kernel, m, n, k, monkeypatch):
    codes, scale = random_weight(n, k, seed=m)
    fast = kernel_weight(kernel, codes, scale, monkeypatch)
    x = varied_input(2, m, k, seed=m + k)
    x[0, 0] = 0.0  # a row of zeros: scale 0, codes 0
    got = int8.int8_linear(x, fast)
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, k))
    assert torch.equal(got, ref)
    assert torch.equal(int8.int8_linear(x[1], fast), ref[1])  # m rows: odd ones too (tiles' tails)
    assert torch.equal(int8.int8_weight_codes(fast), codes)


@needs_native
def test_prepare_keeps_one_copy_for_this_cpus_kernel():
    codes, scale = random_weight(24, 96)
    fast = int8.prepare_int8(codes, scale)
    if int8.onednn_int8_exact():
        assert fast.mm and fast.panels is None and torch.equal(fast.codes, codes)
    else:
        assert not fast.mm and fast.codes is None and fast.panels is not None


@needs_native
@pytest.mark.parametrize("k", [1, 2, 7])
def test_a_layer_of_few_inputs_is_exact_on_the_kernel_prepare_picks(k):
    """oneDNN's int8 matmul misreads a weight of one input (results changed between calls), so
    prepare keeps such narrow layers on the panels; every size gives the reference's sums."""
    codes, scale = random_weight(16, k)
    fast = int8.prepare_int8(codes, scale)
    ref = int8.int8_linear_reference
    for m in (1, 5, 8, 40):
        x = varied_input(m, k, seed=m)
        assert torch.equal(int8.int8_linear(x, fast), ref(x, int8.Int8Weight(codes, scale, k)))


@pytest.mark.parametrize("kernel", KERNELS)
def test_full_range_codes_do_not_saturate(kernel, monkeypatch):
    """-128 weights against ±127 activations: pair sums beyond int16 stay exact."""
    k = 256
    codes = torch.full((16, k), -128, dtype=torch.int8)
    codes[8:] = 127
    x = torch.ones(3, k)
    x[1] = -1.0
    x[2, ::2] = -1.0
    y = int8.int8_linear(x, kernel_weight(kernel, codes, torch.ones(16), monkeypatch))
    exact = (torch.round(x * 127) @ codes.float().T) * (torch.ones(()) / 127.0)  # sums < 2^24
    assert torch.equal(y, exact)


def test_layers_wider_than_int32_sums_hold_keep_the_reference():
    """Past 132,104 inputs a full-range int32 sum wraps (a kernel gave -16,038,640 for
    +17,780,000): such layers keep the reference's exact sums (none in today's models)."""
    k = int8.INT32_EXACT_K + 1
    codes = torch.full((2, k), 127, dtype=torch.int8)
    weight = int8.prepare_int8(codes, torch.ones(2))
    assert weight.panels is None and not weight.mm
    x = torch.ones(1, k)
    q, sx = int8.quantize_tokens(x)
    exact = (q.long() @ codes.long().T).double() * sx.double()
    assert torch.equal(int8.int8_linear(x, weight), exact.float()) and exact.min() > 0
    assert 127 * 127 * int8.INT32_EXACT_K < 2**31 <= 128 * 127 * (int8.INT32_EXACT_K + 1)


def test_reference_sums_are_exact_beyond_float32s_integers():
    """K = 3000 full-range products exceed float32's exact integers: the reference still sums
    exactly (compared with int64 arithmetic)."""
    k = 3000
    codes = torch.full((4, k), 127, dtype=torch.int8)
    codes[1] = -128
    codes[2, ::3] = -128
    x = torch.ones(2, k)
    x[1, 1::2] = -1
    got = int8.int8_linear_reference(x, int8.Int8Weight(codes, torch.ones(4), k))
    q, sx = int8.quantize_tokens(x)
    exact = (q.long() @ codes.long().T).double() * sx.double()
    assert torch.equal(got, exact.float())


def test_reference_is_close_to_float_linear():
    codes, scale = random_weight(32, 256)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    w = codes.float() * scale.unsqueeze(1)
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, 256))
    exact = F.linear(x, w)
    assert (ref - exact).norm() / exact.norm() < 0.01  # 8-bit per-token activations


def test_kernel_isa_holds_the_vnni_choice(monkeypatch):
    monkeypatch.delenv("LOWBIT_KERNEL_ISA", raising=False)
    monkeypatch.setattr(int8, "cpu_flags", lambda: {"avx2", "avx512_vnni", "avx_vnni"})
    assert int8.has_avx512_vnni() and int8.has_vnni()
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avxvnni")  # AVX2 + AVX-VNNI: no AVX-512
    assert not int8.has_avx512_vnni() and int8.has_vnni()
    monkeypatch.setattr(int8, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert not int8.has_vnni()
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avx2")  # no VNNI of any kind: the panels
    monkeypatch.setattr(int8, "cpu_flags", lambda: {"avx2", "avx512_vnni", "avx_vnni"})
    assert not int8.has_avx512_vnni() and not int8.has_vnni()
    assert not int8.onednn_int8_exact.__wrapped__()


def test_per_token_scaling_protects_small_rows():
    """A tiny row next to a huge one keeps its precision (one range per token, not per batch)."""
    codes, scale = random_weight(16, 128)
    w = codes.float() * scale.unsqueeze(1)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))
    x[1] *= 1e-4
    ref = int8.int8_linear_reference(x, int8.Int8Weight(codes, scale, 128))
    small = F.linear(x[1:], w)
    assert (ref[1:] - small).norm() / small.norm() < 0.02


def test_without_native_kernels_the_reference_runs(monkeypatch):
    monkeypatch.setattr(int8, "native_ops", lambda: False)
    codes, scale = random_weight(8, 64)
    weight = int8.prepare_int8(codes, scale)
    assert weight.panels is None and not weight.mm
    x = torch.randn(3, 64)
    assert torch.equal(int8.int8_linear(x, weight), int8.int8_linear_reference(x, weight))


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_nan_and_tiny_rows_match_the_reference(kernel, monkeypatch):
    """No rows; a row with a NaN or an infinity (its outputs are NaN, the others untouched);
    a row too small for 127/absmax to be finite (its outputs are 0)."""
    codes, scale = random_weight(13, 37)
    fast = kernel_weight(kernel, codes, scale, monkeypatch)
    slow = int8.Int8Weight(codes, scale, 37)
    assert int8.int8_linear(torch.randn(0, 37), fast).shape == (0, 13)
    x = varied_input(5, 37)
    x[1, 3], x[2, 30], x[3] = float("nan"), float("inf"), 1e-38
    got, ref = int8.int8_linear(x, fast), int8.int8_linear_reference(x, slow)
    assert got[1:3].isnan().all() and ref[1:3].isnan().all()
    assert torch.equal(got[3], torch.zeros(13)) and torch.equal(ref[3], torch.zeros(13))
    assert torch.equal(got[[0, 4]], ref[[0, 4]])
