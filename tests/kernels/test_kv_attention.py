"""Decode attention over a cache of codes: the native op against its reference (the same stored
codes, the same output), and the reference against attention over the unrounded values."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.build import native_ops
from lowbit.kernels.kv_attention import decode_attention_codes, decode_attention_codes_reference
from lowbit.primitives.hadamard import hadamard
from lowbit.primitives.kv import encode_heads

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")
EMPTY = torch.empty(0)


def _case(b, heads, kv, dim, slots, bits, group, seed=0):
    """Projections of the new token, one layer's cache holding the codes of random keys/values
    in every slot, RoPE tables, and all keys/values in float (the new slot's: the projections')."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (heads + 2 * kv) * dim, generator=g) * 2
    k = torch.randn(b, kv, slots, dim, generator=g) * 3 + 1  # an offset, as real keys have
    v = torch.randn(b, kv, slots, dim, generator=g)
    stored = [t for x in (k, v) for t in encode_heads(x, bits, group)]
    ang = torch.arange(slots).unsqueeze(1) * torch.linspace(0.01, 1, dim).unsqueeze(0)
    return qkv, stored, ang.cos(), ang.sin(), k, v


def _options(kind, kv, dim, seed=1):
    """(q_norm, k_norm, center, rotation, query_bits) of each kind of prepared heads."""
    g = torch.Generator().manual_seed(seed)
    norms = [torch.rand(dim, generator=g) + 0.5 for _ in range(2)]
    center = torch.randn(kv, dim, generator=g)
    return {
        "plain": (EMPTY, EMPTY, EMPTY, EMPTY, 0),
        "norms": (*norms, EMPTY, EMPTY, 0),
        "kv4-preset": (EMPTY, EMPTY, center, hadamard(dim, torch.float32), 0),
        "everything": (*norms, center, hadamard(dim, torch.float32), 8),
        "queries": (EMPTY, EMPTY, EMPTY, EMPTY, 4),
    }[kind]


def _both(case, heads, kv, pad, pos, bits, kind):
    """(native output, reference output, native cache, reference cache)."""
    qkv, stored, cos, sin, _, _ = case
    qn, kn, center, rotation, qbits = _options(kind, kv, cos.shape[-1])
    mine, theirs = [t.clone() for t in stored], [t.clone() for t in stored]
    rest = (cos, sin, pad, pos, heads, kv, cos.shape[-1] ** -0.5, qn, kn, 1e-6, center, rotation,
            bits, qbits)  # fmt: skip
    got = torch.ops.lowbit_cpu.decode_attention_codes(qkv, *mine, *rest)
    ref = decode_attention_codes_reference(qkv, *theirs, *rest)
    return got, ref, mine, theirs


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@needs_native
@pytest.mark.parametrize(
    "b,heads,kv,dim,slots,pos,bits,group",
    [(1, 9, 3, 64, 700, 699, 4, 32), (2, 4, 2, 16, 40, 32, 4, 8), (3, 4, 4, 128, 600, 499, 8, 64),
     (1, 2, 1, 12, 9, 8, 4, 4), (2, 6, 2, 96, 300, 298, 3, 96), (1, 4, 2, 64, 5, 0, 4, 32),
     (1, 4, 2, 64, 400, 399, 6, 16), (2, 4, 2, 32, 30, 20, 2, 32), (1, 8, 1, 64, 70, 66, 4, 8),
     (2, 4, 1, 128, 45, 41, 4, 128)],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["plain", "kv4-preset", "everything"])
def test_native_matches_reference(b, heads, kv, dim, slots, pos, bits, group, kind):
    """The same codes stored and the same output: GQA (1 to 8 query heads per key head), left
    padding, 2 to 8 bits, head sizes and groups the vector path takes and the others, the
    threaded long-context split, a context of one slot; plain heads, centred and turned keys
    (the kv4 preset), and with per-head norms and rounded queries as well."""
    if kind != "plain" and dim & (dim - 1):  # no Hadamard turn of this size: the rest
        kind = {"kv4-preset": "norms", "everything": "queries"}[kind]
    case = _case(b, heads, kv, dim, slots, bits, group)
    pad = torch.tensor([0, 3, 1][:b]).clamp_max(pos)
    got, ref, mine, theirs = _both(case, heads, kv, pad, pos, bits, kind)
    assert got.shape == (b, heads * dim)
    assert all(torch.equal(m, t) for m, t in zip(mine, theirs, strict=True))
    assert _rel(got, ref) < 1e-5


def test_attention_over_codes_follows_the_float_values():
    """8-bit codes give nearly the float attention, 4-bit a rougher one (the wrapper: native
    where built, else the reference), plain heads."""
    for bits, tol in ((8, 0.02), (4, 0.25)):
        qkv, stored, cos, sin, k, v = _case(2, 6, 2, 32, 50, bits, 32, seed=1)
        pad, dim = torch.tensor([0, 4]), 32
        got = decode_attention_codes(qkv, *stored, cos, sin, pad, 49, 6, 2, dim**-0.5, EMPTY,
                                     EMPTY, 1e-6, EMPTY, EMPTY, bits, 0)  # fmt: skip
        q, kn, vn = qkv.view(2, 10, 1, dim).split([6, 2, 2], dim=1)
        c, s = cos[[49, 45]][:, None, None], sin[[49, 45]][:, None, None]
        from lowbit.kernels.decode import rotate

        k, v = k.clone(), v.clone()
        k[:, :, 49:], v[:, :, 49:] = rotate(kn, c, s), vn
        mask = (torch.arange(50).unsqueeze(0) >= pad.unsqueeze(1))[:, None, None]
        ref = F.scaled_dot_product_attention(rotate(q, c, s), k, v, attn_mask=mask,
                                             scale=dim**-0.5, enable_gqa=True)  # fmt: skip
        assert _rel(got, ref.reshape(2, -1)) < tol


def test_a_strided_cache_takes_the_reference():
    """Rows of a larger cache (a view that is not contiguous) are written through the view and
    give the result the same rows give alone."""
    qkv, stored, cos, sin, _, _ = _case(3, 4, 2, 16, 20, 4, 16)
    views = [t[::2] for t in stored]  # rows 0 and 2 of every tensor
    assert not views[0].is_contiguous()
    alone = [t.clone().contiguous() for t in views]
    rest = (cos, sin, torch.tensor([0, 2]), 19, 4, 2, 0.25, EMPTY, EMPTY, 1e-6, EMPTY, EMPTY, 4, 0)
    got = decode_attention_codes(qkv[::2], *views, *rest)
    ref = decode_attention_codes(qkv[::2].contiguous(), *alone, *rest)
    assert _rel(got, ref) < 1e-5
    assert all(torch.equal(t[::2], a) for t, a in zip(stored, alone, strict=True))


@needs_native
def test_bad_calls_are_refused():
    qkv, stored, cos, sin, _, _ = _case(1, 2, 1, 16, 8, 4, 16)
    op = torch.ops.lowbit_cpu.decode_attention_codes

    def call(qkv=qkv, stored=stored, pad=(0,), pos=4, center=EMPTY):
        return op(qkv, *stored, cos, sin, torch.tensor(pad), pos, 2, 1, 0.25, EMPTY, EMPTY,
                  1e-6, center, EMPTY, 4, 0)  # fmt: skip

    with pytest.raises(RuntimeError, match="outside a cache"):
        call(pos=8)
    with pytest.raises(RuntimeError, match="no slot"):
        call(pad=(5,))
    with pytest.raises(RuntimeError, match="float16"):
        call(stored=[stored[0], stored[1].float(), *stored[2:]])
    with pytest.raises(RuntimeError, match="not finite"):
        call(qkv=torch.full_like(qkv, float("nan")))
    with pytest.raises(RuntimeError, match="centres"):
        call(center=torch.zeros(3, 16))
