"""The native affine kernel against its plain-PyTorch reference, and the layout round trip."""

import pytest
import torch

from helpers import random_affine, torch_threads
from lowbit.kernels import affine, int8
from lowbit.kernels.build import native_ops
from lowbit.kernels.int8 import has_avx512_vnni


@pytest.mark.parametrize("n", [5, 16, 37])  # rows one by one, whole blocks of 16, both
@pytest.mark.parametrize("k", [32, 64, 96, 128])  # whole chunks of 64, and a last half chunk
def test_run_packing_round_trips_exactly(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    assert torch.equal(affine.unpack_runs(affine.pack_runs(codes, 4), 4), codes)
    assert affine.pack_runs(codes, 4).shape == (n, k // 2)
    params = torch.randn(n, k // 32)
    assert torch.equal(affine.row_params(affine.interleave_params(params), 4), params)


def test_block_layout_puts_16_rows_in_the_lanes_of_64_bytes():
    codes = torch.zeros(18, 64, dtype=torch.uint8)
    codes[3, 13] = 5  # run 0, part j = 1, high nibble of byte t = 1, lane (row) 3
    codes[4, 32 + 2] = 7  # run 1, part 0, low nibble of byte 2, lane 4
    codes[17, 40] = 9  # past the last whole block: row by row, chunk 0, byte 8 high
    packed = affine.pack_runs(codes, 4)
    block = packed[:16].flatten()
    assert block[64 + 4 * 3 + 1] == 5 << 4 and block[256 + 4 * 4 + 2] == 7
    assert int((block != 0).sum()) == 2
    assert packed[17, 8] == 9 << 4 and int((packed[16:] != 0).sum()) == 1
    scale = torch.arange(18 * 2, dtype=torch.float32).reshape(18, 2)
    held = affine.interleave_params(scale)
    assert held[:16].flatten()[16 * 1 + 3] == scale[3, 1]  # group-major within the block
    assert torch.equal(held[16:], scale[16:])


def test_chunk_layout_puts_two_runs_in_the_nibbles_of_32_bytes():
    codes = torch.arange(96).remainder(16).to(torch.uint8).reshape(1, 96)
    packed = affine.pack_runs(codes, 4)[0]
    assert packed[0] == codes[0, 0] | codes[0, 32] << 4  # chunk 0: codes j and 32 + j
    assert packed[31] == codes[0, 31] | codes[0, 63] << 4
    assert packed[32] == codes[0, 64] | codes[0, 80] << 4  # last half chunk: j and 16 + j


def test_params_are_float16_only_when_exact():
    assert random_affine(4, 64, 32, 4, params="f16").scale.dtype == torch.float16
    assert random_affine(4, 64, 32, 4).offset.dtype == torch.float32


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_grids_store_no_offsets_and_mean_the_same_weight(bits):
    sym = random_affine(6, 64, 32, bits, params="sym")
    assert sym.offset.numel() == 0
    w = affine.affine_dequantize_reference(sym)
    u = affine.unpack_runs(sym.w, bits).float().reshape(6, 2, 32)
    expected = ((u - 2 ** (bits - 1)) * sym.scale.float().unsqueeze(-1)).reshape(6, 64)
    assert torch.equal(w, expected)


def test_reference_dequantizes_per_group():
    codes = torch.tensor([[0, 1] * 16 + [2, 3] * 16], dtype=torch.uint8)  # (1, 64)
    scale, offset = torch.tensor([[0.5, 2.0]]), torch.tensor([[-1.0, 1.0]])
    aw = affine.to_affine(codes, scale, offset, (1, 32), 4)
    w = affine.affine_dequantize_reference(aw)
    assert torch.equal(w[0, :2], torch.tensor([-1.0, -0.5]))
    assert torch.equal(w[0, 32:34], torch.tensor([5.0, 7.0]))


def test_per_channel_rows_pad_to_a_whole_run():
    aw = random_affine(7, 50, -1, 4)  # 50 is not a multiple of 32
    assert aw.padded_in == 64 and aw.in_features == 50
    x = torch.randn(3, 50)
    for act8, reference in ((False, affine.affine_linear_reference),
                            (True, affine.affine_linear_act8_reference)):  # fmt: skip
        ref = reference(x, aw)
        assert ref.shape == (3, 7)
        assert torch.allclose(affine.affine_linear(x, aw, act8), ref, rtol=1e-4, atol=1e-4)


needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17, 33, 70])  # decode rows, tails, GEMM path
@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (13, 96, 32), (7, 576, 32), (40, 576, 64),
                                       (33, 192, 192), (24, 100, -1), (10, 1536, 96),
                                       (5, 288, 96), (9, 1056, 32), (6, 448, 32),
                                       (11, 416, 32)])  # fmt: skip
@pytest.mark.parametrize("act8", [True, False])
@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("params", ["f16", "f32", "sym"])
def test_native_matches_reference(bits, m, n, k, group, act8, isa, params, monkeypatch):
    check_native(bits, m, n, k, group, act8, isa, params, monkeypatch)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 2, 6])  # one row, several (4-bit: blocks, 4 rows a pass)
@pytest.mark.parametrize("n,k,group", [(12, 2048, 128), (16, 1024, 512), (6, 1088, 64),
                                       (7, 288, -1), (5, 640, 64), (4, 896, 128),
                                       (3, 2048, 1024), (50, 2048, 128), (32, 288, -1),
                                       (17, 1024, 512)])  # fmt: skip
@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("params", ["f16", "f32", "sym"])
def test_decode_kernels_take_any_power_of_two_group_and_per_channel_grids(
    bits, m, n, k, group, isa, params, monkeypatch
):
    """Groups of 2^j runs and one group per row, in whole and short blocks of 16 runs (1088:
    34 runs; 640 and 896: a short block of several groups; 2048 / 1024: two groups of 32 runs
    per row) and with a row's last half chunk (288 per channel: 9 runs)."""
    check_native(bits, m, n, k, group, True, isa, params, monkeypatch)


def check_native(bits, m, n, k, group, act8, isa, params, monkeypatch):
    if isa == "avx2":  # the AVX2 kernel also where AVX-512 VNNI would be chosen
        monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avx2")
    else:  # where that is AVX-512, its own form for several rows too (whatever ran faster)
        monkeypatch.setenv("LOWBIT_KERNEL_ROWS", "")
    aw = random_affine(n, k, group, bits, seed=m + n, params=params)
    assert aw.scale.dtype == (torch.float32 if params == "f32" else torch.float16)
    assert (aw.offset.numel() == 0) == (params == "sym")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 1000 + k))
    # act8: decode rows the integer GEMV, more rows the integer GEMM
    reference = affine.affine_linear_act8_reference if act8 else affine.affine_linear_reference
    ref = reference(x, aw)
    got = torch.ops.lowbit_cpu.affine_linear(
        torch.nn.functional.pad(x, (0, aw.padded_in - k)), aw.w, aw.scale, aw.offset,
        aw.group, aw.bits, act8,
    )  # fmt: skip
    # fp32 sums in another order (the int8 path also cancels its uncentred sums against a
    # correction): relative to the size of the output
    assert torch.allclose(got, ref, rtol=1e-4, atol=2e-4 * ref.abs().max().item())


@needs_native
@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("m", [2, 70])  # the GEMV and the prompt GEMM
def test_8bit_codes_at_the_grid_ends_do_not_saturate(isa, m, monkeypatch):
    """Codes 0 and 255 (centred -128 and 127) against int8 inputs of ±127: every vpmaddubsw
    pair of the AVX2 forms sits at the int16 limits; the sums must stay exact."""
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avx2" if isa == "avx2" else "")
    n, k = 24, 576
    codes = torch.zeros(n, k, dtype=torch.uint8)
    codes[::2] = 255
    codes[1::3, ::5] = 255
    codes[:, 7::11] = 128  # centred zeros between them
    scale = torch.full((n, 1), 0.5)
    aw = affine.to_affine(codes, scale, -128 * scale, (1, k), 8)
    x = torch.ones(m, k)
    x[1::2, ::2] = -1.0  # rows of ±1: codes ±127, one scale per block of 32
    got = affine.affine_linear(x, aw, act8=True)
    ref = affine.affine_linear_act8_reference(x, aw)
    exact = x @ ((codes.float() - 128) * 0.5).T  # the inputs are on the act8 grid exactly
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-3)
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-2)


@needs_native
@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("params", ["sym", "f16"])
@pytest.mark.parametrize("m", [1, 3, 70])  # the GEMV, rows in a pass, the prompt GEMM
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_an_input_row_holding_nan_or_infinity_gives_nan_outputs(isa, bits, params, m, bad,
                                                                 monkeypatch):  # fmt: skip
    """As the reference does: the int8 inputs' block maxima dropped a NaN, and a symmetric
    grid never read the block sums where it stayed, so a NaN came out as finite numbers."""
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avx2" if isa == "avx2" else "")
    aw = random_affine(24, 192, 32, bits, params=params)
    x = torch.randn(m, 192, generator=torch.Generator().manual_seed(m))
    x[0, 0] = bad
    for got in (affine.affine_linear(x, aw, act8=True), affine.affine_linear_act8_reference(x, aw)):
        assert got[0].isnan().all()
        assert torch.isfinite(got[1:]).all()


@pytest.mark.parametrize("m", [1, 4])
def test_act8_path_costs_far_less_than_the_4bit_weights(m):
    """int8 inputs per block of 32 add an error an order of magnitude below the weights' own."""
    from lowbit.formats import WeightSpec
    from lowbit.nn import QuantLinear, kernel_module
    from lowbit.primitives import quantize_weight

    w = torch.randn(64, 576)
    layer = QuantLinear.from_quantized(quantize_weight(w, WeightSpec(bits=4, group_size=64)))
    fast = kernel_module(layer)
    aw = affine.AffineWeight(fast.w, fast.scale, fast.offset, fast.group, 4, 576)
    x = torch.randn(m, 576) * torch.linspace(0.05, 5, 576)  # channels of very different size
    exact = affine.affine_linear_reference(x, aw)
    act8_err = (affine.affine_linear_act8_reference(x, aw) - exact).norm()
    weight_err = (torch.nn.functional.linear(x, w) - exact).norm()
    assert act8_err < 0.1 * weight_err


def test_act8_quantizer_round_trips_within_half_a_step():
    x = torch.randn(3, 64) * 3
    q, s = affine.quantize_rows_act8(x)
    assert q.abs().max() <= 127
    back = (q.reshape(3, 2, 32) * s.unsqueeze(-1)).reshape(3, 64)
    assert ((back - x).abs().reshape(3, 2, 32) <= s.unsqueeze(-1) / 2 + 1e-6).all()


@needs_native
def test_native_handles_leading_dims_and_noncontiguous_input():
    aw = random_affine(16, 64, 32, 4)
    x = torch.randn(2, 64, 3).transpose(1, 2)  # (2, 3, 64), not contiguous
    ref = affine.affine_linear_act8_reference(x, aw)
    assert torch.allclose(affine.affine_linear(x, aw), ref, rtol=1e-4, atol=1e-4)


@needs_native
def test_native_rejects_bad_shapes_with_a_message():
    aw = random_affine(4, 64, 32, 4)
    with pytest.raises(RuntimeError, match="weight width"):
        torch.ops.lowbit_cpu.affine_linear(
            torch.randn(1, 96), aw.w, aw.scale, aw.offset, 32, 4, True
        )


def test_fallback_without_native_ops_uses_the_reference(monkeypatch):
    monkeypatch.setattr(affine, "native_ops", lambda: False)
    aw = random_affine(8, 64, 32, 4)
    x = torch.randn(2, 64)
    assert torch.equal(affine.affine_linear(x, aw), affine.affine_linear_act8_reference(x, aw))
    assert torch.equal(
        affine.affine_linear(x, aw, act8=False), affine.affine_linear_reference(x, aw)
    )
    big = torch.randn(40, 64)  # evaluation-sized: float inputs unless act8 is asked for
    assert torch.equal(affine.affine_linear(big, aw), affine.affine_linear_reference(big, aw))
    assert torch.equal(
        affine.affine_linear(big, aw, act8=True), affine.affine_linear_act8_reference(big, aw)
    )


def test_non_float32_inputs_take_the_reference_path():
    aw = random_affine(8, 64, 32, 8)
    x = torch.randn(2, 64, dtype=torch.float64)
    y = affine.affine_linear(x, aw)
    assert y.dtype == torch.float64


@pytest.mark.parametrize(
    "bits,block,shape,ok",
    [(4, (1, 64), (8, 576), True), (4, (1, 48), (8, 96), False), (3, (1, 64), (8, 64), False),
     (8, (1, 100), (8, 100), True), (4, (8, 64), (8, 64), True), (4, (8, 32), (8, 64), False),
     (4, (1, 32), (8, 576), True)],
)  # fmt: skip
def test_supports(bits, block, shape, ok):
    assert affine.supports(bits, block, shape) is ok


@needs_native
def test_kernel_isa_is_reported_and_can_be_forced(monkeypatch):
    assert torch.ops.lowbit_cpu.kernel_isa() in ("avx2", "avx2+avx-vnni", "avx512-vnni")
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avx2")
    assert torch.ops.lowbit_cpu.kernel_isa() == "avx2"
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avxvnni")  # (a compiler before GCC 11: "avx2")
    vnni = "avx_vnni" in int8.cpu_flags()
    assert torch.ops.lowbit_cpu.kernel_isa() in (("avx2+avx-vnni", "avx2") if vnni else ("avx2",))


@needs_native
@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("code", [0, 255])  # centred -128 and 127: the widest products
@pytest.mark.parametrize("rows", [slice(0, 40), slice(13, 14), slice(10, 16), slice(0, 32)])
@pytest.mark.parametrize("k", [256, 288])  # (288: a row ending in a half chunk)
def test_8bit_int8_input_paths_hold_the_extreme_products(isa, code, rows, k, monkeypatch):
    """Every input at ±absmax (codes ±127) against 8-bit codes 0 or 255: each vpmaddubsw pair
    of the AVX2 kernels is 2·128·127 = 32512 or 2·127·127, the largest there is, and the sums
    equal the reference's (no saturation, -128 handled by |c| and the inputs' sign), in the
    prompt GEMM (40 rows) and the decode GEMV (one row, its several-row kernels)."""
    if isa == "avx2":
        monkeypatch.setenv("LOWBIT_KERNEL_ISA", "avx2")
    n = 24
    codes = torch.full((n, k), code, dtype=torch.uint8)
    scale = torch.full((n, k // 32), 2.0**-10)  # groups of 32: the one-row decode kernels
    aw = affine.to_affine(codes, scale, -128 * scale, (1, 32), 8)
    x = torch.tensor([1.0, -1.0]).repeat(40 * k // 2).reshape(40, k)  # mixed signs
    x[14:27], x[27:] = -1.0, 1.0  # rows of one sign
    x = (x * torch.arange(1, 41).unsqueeze(1))[rows]  # a different absmax per row
    got = affine.affine_linear(x, aw, act8=True)
    assert torch.allclose(got, affine.affine_linear_act8_reference(x, aw), rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [33, 35, 70])  # above kGemvMaxM: the GEMM; row tails
@pytest.mark.parametrize(
    ("n", "k", "group"),
    [(13, 96, 32), (40, 576, 64), (10, 1536, 96), (48, 1536, 96), (36, 288, -1)],
)
@pytest.mark.parametrize("params", ["f16", "sym"])
def test_avx_vnni_integer_gemm_equals_avx2s_to_the_bit(bits, m, n, k, group, params,
                                                       monkeypatch):  # fmt: skip
    """The prefill GEMM's AVX-VNNI tile sums each block with vpdpbusd where the AVX2 tile
    takes vpmaddubsw + int16 adds (4-bit codes) or llama.cpp's signed products (8-bit codes):
    the same integers, the same float epilogue."""
    if "avx_vnni" not in int8.cpu_flags():
        pytest.skip("the CPU has no AVX-VNNI")
    aw = random_affine(n, k, group, bits, seed=m + n, params=params)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 1000 + k))
    x = torch.nn.functional.pad(x, (0, aw.padded_in - k))
    out = {}
    for isa in ("avx2", "avxvnni"):
        monkeypatch.setenv("LOWBIT_KERNEL_ISA", isa)
        out[isa] = torch.ops.lowbit_cpu.affine_linear(x, aw.w, aw.scale, aw.offset, aw.group,
                                                      aw.bits, True)  # fmt: skip
    assert torch.equal(out["avx2"], out["avxvnni"])


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,group,taps", [(32, 64, -1, 16), (48, 100, -1, 16), (27, 96, 32, 9),
                                            (4, 32, 32, 1)])  # fmt: skip
@pytest.mark.parametrize("params", ["f16", "f32", "sym"])
def test_column_dequantize_is_the_transposed_blocks_to_the_bit(bits, n, k, group, taps, params,
                                                               monkeypatch):  # fmt: skip
    """Rows b·taps + t of a column matrix land at out[k, b·taps + t] (a transposed
    convolution's (in, out, kh, kw) weight, contiguous): the native pass equals the native
    dequantize, transposed, to the bit (the run padding dropped), and the plain-PyTorch
    fallback up to its separate multiply and add."""
    aw = random_affine(n, k, group, bits, seed=n + k, params=params)
    got = affine.affine_dequantize_columns(aw, taps)
    rows = affine.affine_dequantize(aw)  # (n, k), native
    assert got.shape == (k, n) and got.is_contiguous()
    assert torch.equal(got, rows.t())
    assert torch.equal(got.view(k, n // taps, taps)[:, -1, 0], rows[n - taps])
    monkeypatch.setattr(affine, "native_ops", lambda: False)
    torch.testing.assert_close(affine.affine_dequantize_columns(aw, taps), got, rtol=1e-6,
                               atol=1e-7)  # fmt: skip


@needs_native
def test_column_dequantize_rejects_taps_that_do_not_divide_the_rows():
    aw = random_affine(30, 64, -1, 8)
    with pytest.raises(RuntimeError, match="taps must divide"):
        torch.ops.lowbit_cpu.affine_dequantize_columns(aw.w, aw.scale, aw.offset, aw.group, 8,
                                                       16, 64)  # fmt: skip


@needs_native
@pytest.mark.parametrize("m", [1, 3, 5])
@pytest.mark.parametrize("params", ["f16", "f32", "sym"])
def test_4bit_block_rows_are_the_same_on_both_isas_and_any_split(m, params, monkeypatch):
    """The block kernels sum a run exactly in int32 and then take the same float steps on
    AVX-512 and AVX2, so a block's rows agree to the bit; rows cut from their block by a
    thread's split (the experts op splits its matrices' rows as one range) are computed whole."""
    if not has_avx512_vnni():
        pytest.skip("needs the AVX-512 VNNI kernels beside the AVX2 ones")
    aw = random_affine(40, 576, 64, 4, seed=m, params=params)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m))
    out = {}
    for isa in ("", "avx2"):
        monkeypatch.setenv("LOWBIT_KERNEL_ISA", isa)
        out[isa] = affine.affine_linear(x, aw, True)
    assert torch.equal(out[""][:, :32], out["avx2"][:, :32])
    monkeypatch.setenv("LOWBIT_KERNEL_ISA", "")
    with torch_threads(2):
        three = affine.affine_experts(x[:1], [aw, aw, aw])  # 120 rows as one: split at 60
    # (60: row 20 of block 1; rows 32..39, past the blocks, take the row kernels, whose one-row
    # and several-row forms sum in other orders)
    assert all(torch.equal(three[e, :32], out[""][0, :32]) for e in range(3))
