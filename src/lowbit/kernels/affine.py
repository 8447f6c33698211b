"""Affine low-bit weights (4- or 8-bit codes, one scale and offset per group) times fp32 inputs.

The op is ``lowbit_cpu::affine_linear`` (C++, see ``csrc/affine_gemv.cpp``); the plain-PyTorch
:func:`affine_linear_reference` beside it defines the result and runs wherever the native op
cannot (no AVX2, no compiler, ``LOWBIT_KERNELS=off``, tensors not on the CPU).

Any integer grid is affine per block (``w = scale·u + offset``), so one kernel serves symmetric
grids, integer zero points and float offsets. :func:`to_affine` converts lowbit's saved codes and
block params into the kernel's layout once, at load time.

Layers can take the ``act8`` path: each row of x is quantized to int8 per block of 32
inputs (scale = absmax / 127, as llama.cpp does for its activations) so that codes and inputs
meet in integer multiply-adds; :func:`affine_linear_act8_reference` defines it. Decode-sized
inputs (at most ``GEMV_MAX_ROWS`` rows) take it by default, through a GEMV that streams the
packed codes (as llama.cpp's decode does for Q4_0 and Q8_0 weights; the 8-bit heads of
``w4-...-head8`` models read 29 MB per token on smollm2-135m, which the float-input GEMV read
at 22-26 GB/s); larger inputs take it when the caller asks
(the decode loop's prompts), through an integer GEMM (``csrc/affine_q8_gemm.cpp``; for 8-bit
codes 1.8–2.2x float32 with VNNI and 0.93–0.99x on AVX2 alone, where the float tiles ran
0.63–0.90x: README, "8-bit weight-only prompts"). Otherwise (evaluation windows longer than
``GEMV_MAX_ROWS``) inputs stay float, as :func:`affine_linear_reference` defines (large inputs:
the codes dequantized tile by tile into torch's GEMM).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lowbit.kernels.build import native_ops

RUN = 32  # codes per layout run; a group must be a whole number of runs
BLOCK = 16  # rows of 4-bit codes stored interleaved (csrc/affine_blocks.h)
GEMV_MAX_ROWS = 32  # above this many rows the native op runs a GEMM instead of a GEMV


@dataclass
class AffineWeight:
    """Kernel layout: ``w`` uint8 (N, Kp·bits/8), ``scale``/``offset`` (N, Kp/group), both
    float16 when that holds them exactly (lowbit's saved grids usually are), else float32.
    Symmetric grids store no offsets: ``offset`` is empty and means ``-2**(bits-1)·scale``.
    4-bit weights keep each whole block of ``BLOCK`` rows interleaved, codes and params
    (:func:`pack_runs`, :func:`interleave_params`): tensor rows 16b..16b+15 hold that block,
    and rows past the last whole block are stored one after another.

    ``in_features`` is the layer's K; ``Kp`` ≥ K is K padded to a whole run (per-channel
    layers only; padded codes are 0 and padded inputs are 0, so they add nothing)."""

    w: Tensor
    scale: Tensor
    offset: Tensor
    group: int
    bits: int
    in_features: int

    @property
    def padded_in(self) -> int:
        return self.w.shape[1] * 8 // self.bits

    @functools.cached_property
    def layout(self) -> tuple:
        """What :func:`experts_fit` compares: shape, group, bits, K, padded K, params dtype,
        whether offsets are stored (the tensors' metadata, fixed for this object)."""
        return (tuple(self.w.shape), self.group, self.bits, self.in_features, self.padded_in,
                self.scale.dtype, bool(self.offset.numel()))  # fmt: skip


def supports(bits: int, block: tuple, shape: tuple) -> bool:
    """Whether a layer with this code width, block (rows, cols) and (out, in) shape fits."""
    n_in = shape[1]
    if bits not in (4, 8):
        return False
    if block[1] == n_in:  # per-channel or per-tensor: one group per row, padded to a run
        return True
    return block[0] == 1 and block[1] % RUN == 0 and n_in % block[1] == 0


def to_affine(
    codes: Tensor, scale: Tensor, offset: Tensor, block: tuple, bits: int
) -> AffineWeight:
    """Kernel layout from unsigned codes (N, K) and per-block affine params (N/br, K/bc)."""
    k = codes.shape[1]
    scale, offset = (
        p.float().repeat_interleave(block[0], dim=0).contiguous() for p in (scale, offset)
    )
    if torch.equal(offset, -(2 ** (bits - 1)) * scale):  # symmetric: nothing to store
        offset = scale.new_empty(0)
    if exact_in_half(scale) and exact_in_half(offset):  # half the bytes to read per group
        scale, offset = scale.half(), offset.half()
    group = block[1]
    if group == k and k % RUN:  # pad a per-row group to a whole number of runs
        group = -(-k // RUN) * RUN
        codes = F.pad(codes, (0, group - k))
    if bits == 4:
        scale, offset = interleave_params(scale), interleave_params(offset)
    return AffineWeight(pack_runs(codes.to(torch.uint8), bits), scale, offset, group, bits, k)


def exact_in_half(t: Tensor) -> bool:
    """Whether float16 holds every value of ``t`` exactly (and finitely)."""
    half = t.half()
    return bool(torch.isfinite(half).all()) and torch.equal(half.float(), t)


def offsets(aw: AffineWeight) -> Tensor:
    """The float32 (N, Kp/group) offsets, those a symmetric grid does not store included, one
    row per weight row (:func:`row_params`)."""
    if aw.offset.numel():
        return row_params(aw.offset, aw.bits).float()
    return -(2 ** (aw.bits - 1)) * row_params(aw.scale, aw.bits).float()


def pack_runs(codes: Tensor, bits: int) -> Tensor:
    """(N, K) codes -> the kernel's byte layout. 8 bits: as they are. 4 bits, rows one after
    another: chunks of 64 codes in 32 bytes, byte j holding code j (low nibble) and code 32 + j
    (high nibble); a last chunk of 32 codes (K not a multiple of 64) holds codes j and 16 + j.
    4 bits, each whole block of ``BLOCK`` rows (what the decode kernels read, 16 rows per 64
    bytes so that one int8 multiply-add serves 16 rows): per run r (codes 32r..32r+31), 256
    bytes in four parts j of 64; in part j, bytes 4i..4i+3 belong to row i of the block, byte
    t holding code 8j + t (low nibble) and 8j + 4 + t (high nibble) of the run."""
    if bits == 8:
        return codes.contiguous()
    n, k = codes.shape
    whole = n // BLOCK * BLOCK
    blocks = codes[:whole].reshape(-1, BLOCK, k // RUN, 4, 2, 4)  # (b, i, r, j, hi, t)
    blocks = (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)
    return torch.cat([blocks.reshape(whole, k // 2), _pack_rows(codes[whole:])]).contiguous()


def _pack_rows(codes: Tensor) -> Tensor:
    """4-bit codes, rows one after another (see :func:`pack_runs`)."""
    n, k = codes.shape
    full = k // (2 * RUN) * 2 * RUN
    halves = codes[:, :full].reshape(n, full // (2 * RUN), 2, RUN)
    parts = [(halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, full // 2)]
    if full < k:
        last = codes[:, full:]
        parts.append(last[:, : RUN // 2] | (last[:, RUN // 2 :] << 4))
    return torch.cat(parts, dim=1)


def unpack_runs(w: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_runs`: the (N, Kp) codes."""
    if bits == 8:
        return w
    n, k = w.shape[0], w.shape[1] * 2
    whole = n // BLOCK * BLOCK
    blocks = w[:whole].reshape(-1, k // RUN, 4, BLOCK, 4).permute(0, 3, 1, 2, 4)  # (b,i,r,j,t)
    blocks = torch.stack([blocks & 0x0F, blocks >> 4], dim=-2)  # (b, i, r, j, hi, t)
    return torch.cat([blocks.reshape(whole, k), _unpack_rows(w[whole:])])


def _unpack_rows(w: Tensor) -> Tensor:
    n, k = w.shape[0], w.shape[1] * 2
    full = k // (2 * RUN) * 2 * RUN
    chunks = w[:, : full // 2].reshape(n, full // (2 * RUN), RUN)
    parts = [torch.cat([chunks & 0x0F, chunks >> 4], dim=-1).reshape(n, full)]
    if full < k:
        last = w[:, full // 2 :]
        parts.append(torch.cat([last & 0x0F, last >> 4], dim=-1))
    return torch.cat(parts, dim=1)


def interleave_params(p: Tensor) -> Tensor:
    """(N, G) per-row params of 4-bit codes -> their layout: each whole block of ``BLOCK`` rows
    stored group-major, (G, 16), so the decode kernels load one group's 16 rows at once; an
    empty tensor (a symmetric grid's offsets) stays empty."""
    if p.numel() == 0:
        return p
    whole = p.shape[0] // BLOCK * BLOCK
    head = p[:whole].reshape(-1, BLOCK, p.shape[1]).transpose(1, 2).reshape(whole, p.shape[1])
    return torch.cat([head, p[whole:]]).contiguous()


def row_params(p: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`interleave_params` (8-bit weights' params as they are)."""
    if bits == 8 or p.numel() == 0:
        return p
    whole = p.shape[0] // BLOCK * BLOCK
    head = p[:whole].reshape(-1, p.shape[1], BLOCK).transpose(1, 2).reshape(whole, p.shape[1])
    return torch.cat([head, p[whole:]])


def affine_dequantize_reference(aw: AffineWeight) -> Tensor:
    """The float32 (N, Kp) weight of a kernel-layout tensor."""
    u = unpack_runs(aw.w, aw.bits).float()
    n, kp = u.shape
    u = u.reshape(n, kp // aw.group, aw.group)
    scale = row_params(aw.scale, aw.bits).float().unsqueeze(-1)
    return (u * scale + offsets(aw).unsqueeze(-1)).reshape(n, kp)


def affine_dequantize(aw: AffineWeight) -> Tensor:
    """The float32 (N, K) weight (padding dropped): one pass of the native op where it runs,
    else :func:`affine_dequantize_reference`."""
    if aw.w.device.type == "cpu" and native_ops():
        w = torch.ops.lowbit_cpu.affine_dequantize(aw.w, aw.scale, aw.offset, aw.group, aw.bits)
    else:
        w = affine_dequantize_reference(aw)
    return w[:, : aw.in_features]


def affine_dequantize_columns(aw: AffineWeight, taps: int) -> Tensor:
    """A column matrix's float32 weight in its layer's layout: ``aw`` (N, K) transposed,
    (K, N), which is a transposed convolution's (in, out, kh, kw) weight when the code rows
    ``b·taps + t`` hold tap t of output channel b (:mod:`lowbit.nn.kernel_conv`). One native
    pass (blocks of ``taps`` rows) where it runs, else :func:`affine_dequantize` and a
    transpose."""
    if aw.w.device.type == "cpu" and native_ops():
        op = torch.ops.lowbit_cpu.affine_dequantize_columns
        return op(aw.w, aw.scale, aw.offset, aw.group, aw.bits, taps, aw.in_features)
    return affine_dequantize(aw)[:, : aw.in_features].t().contiguous()


def affine_linear_reference(x: Tensor, aw: AffineWeight) -> Tensor:
    """y = x · Wᵀ for x (..., K) in float32."""
    w = affine_dequantize_reference(aw)[:, : aw.in_features]
    return F.linear(x.float(), w)


def quantize_rows_act8(x: Tensor, block: int = RUN) -> tuple[Tensor, Tensor]:
    """(M, Kp) float32 -> int8-valued codes (M, Kp) and scales (M, Kp/block): per block,
    ``q = round(x · (127 / absmax))`` (half to even), ``scale = absmax / 127``. A block too
    small for 127/absmax to be finite gets codes 0; a NaN or infinite input leaves NaN codes.
    127/absmax is a true division, as the kernels': torch computes ``127.0 / amax`` as
    127 · (1 / amax), which differs in the last bit and moves codes at rounding ties."""
    m, kp = x.shape
    blocks = x.reshape(m, kp // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.full_like(amax, 127.0) / amax
    inv = torch.where((amax > 0) & torch.isfinite(inv), inv, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    return q.reshape(m, kp), (amax / 127.0).squeeze(-1)


def affine_linear_act8_reference(x: Tensor, aw: AffineWeight) -> Tensor:
    """The ``act8`` path: y = Σ_g scale·Σ_blocks s_x·((u − mid) · q_x)
    + (offset + mid·scale)·Σ_g x, with x (..., K) quantized per block of 32 inputs
    (:func:`quantize_rows_act8`), exact float sums of x in the offset term, and mid the centre
    code (8 for 4-bit codes, 128 for 8-bit ones)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = F.pad(x.reshape(-1, k).float(), (0, aw.padded_in - k))  # (M, Kp)
    xb, mid = RUN, 1 << (aw.bits - 1)
    q, qs = quantize_rows_act8(x2, xb)
    u = unpack_runs(aw.w, aw.bits).float() - mid  # (N, Kp), centred codes
    m, n, nb = x2.shape[0], u.shape[0], aw.padded_in // xb
    dots = torch.einsum("mbk,nbk->mnb", q.reshape(m, nb, xb), u.reshape(n, nb, xb))
    per_group = aw.group // xb
    scaled = (dots * qs.unsqueeze(1)).reshape(m, n, nb // per_group, per_group).sum(-1)
    xsum = x2.reshape(m, -1, aw.group).sum(-1)  # (M, G)
    scale, offset = row_params(aw.scale, aw.bits).float(), offsets(aw)
    y = (scaled * scale.unsqueeze(0)).sum(-1) + xsum @ (offset + mid * scale).T
    return y.reshape(*lead, n)


def affine_linear(x: Tensor, aw: AffineWeight, act8: bool | None = None) -> Tensor:
    """y = x · Wᵀ for x (..., K): the native op when it is available, else the reference of
    the path the native op would take. ``act8``: whether the inputs are quantized to int8
    (:func:`affine_linear_act8_reference`); None (the layers' default) asks it for calls of at
    most ``GEMV_MAX_ROWS`` rows only: decode steps, but also an evaluation window that short
    and a mixture's expert on the few tokens routed to it, whose numbers then differ slightly
    from the reference ``QuantLinear``'s (longer windows of a dense model keep them exactly);
    the decode loop passes True for its prompts and steps (llama.cpp's arithmetic)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if act8 is None:
        act8 = x2.shape[0] <= GEMV_MAX_ROWS
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and native_ops()):
        if act8:
            return affine_linear_act8_reference(x, aw).to(x.dtype)
        return affine_linear_reference(x, aw).to(x.dtype)
    if aw.padded_in != aw.in_features:
        x2 = F.pad(x2, (0, aw.padded_in - aw.in_features))
    y = torch.ops.lowbit_cpu.affine_linear(x2, aw.w, aw.scale, aw.offset, aw.group, aw.bits, act8)
    return y.reshape(*lead, y.shape[-1])


def experts_fit(aws: list[AffineWeight], in_features: int) -> bool:
    """Whether :func:`affine_experts` takes these weights: at least one, 4-bit codes on whole
    runs (no padding), one shape, group, params dtype and offset layout, ``in_features``
    wide."""
    if not aws:
        return False
    layout = aws[0].layout
    bits, k, padded = layout[2:5]
    return bits == 4 and k == padded == in_features and all(aw.layout == layout for aw in aws)


def affine_experts_reference(x: Tensor, aws: list[AffineWeight], route: Tensor | None) -> Tensor:
    """What :func:`affine_experts` computes, one :func:`affine_linear` per matrix (on int8
    inputs, as decode rows are), the routed sum added in order."""
    ys = [affine_linear(x[0 if x.shape[0] == 1 else e][None], aw, True) for e, aw in enumerate(aws)]
    if route is None:
        return torch.cat(ys)
    out = torch.zeros_like(ys[0])
    for e, y in enumerate(ys):
        out += y * route[e]
    return out


def affine_experts(x: Tensor, aws: list[AffineWeight], route: Tensor | None = None) -> Tensor:
    """Several 4-bit matrices of one shape on decode rows, in one native call
    (``csrc/affine_experts.cpp``: a token's experts, as llama.cpp's ``mul_mat_id``): x (1, K)
    for every matrix or (E, K), row e for matrix e; returns their (E, N) outputs, or with
    ``route`` (E weights) the (1, N) sum of ``route[e]·y_e`` added in order. Equal to the bit to
    one :func:`affine_linear` per matrix on int8 inputs; the weights must pass
    :func:`experts_fit`."""
    if x.dim() != 2 or not experts_fit(aws, x.shape[1]):
        raise ValueError("affine_experts: no weights, or weights of other shapes or layouts")
    if x.shape[0] not in (1, len(aws)) or (route is not None and route.shape != (len(aws),)):
        raise ValueError("affine_experts: x needs 1 or E rows and route E weights")
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and native_ops()):
        return affine_experts_reference(x, aws, route)
    op = torch.ops.lowbit_cpu.affine_experts
    empty = x.new_empty(0)
    return op(x, [aw.w for aw in aws], [aw.scale for aw in aws], [aw.offset for aw in aws],
              aws[0].group, 4, empty if route is None else route.float())  # fmt: skip
