"""Decode attention over a cache of codes: the native op against its reference (the same stored
codes, the same output), and the reference against attention over the unrounded values."""

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels.build import native_ops
from lowbit.kernels.kv_attention import attend_codes, attend_codes_reference
from lowbit.primitives.kv import encode_heads

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


def _case(b, heads, kv, dim, slots, bits, group, seed=0):
    """Queries, the new key/value, one layer's cache holding codes of random keys/values in
    every slot (the new token's slot is overwritten), and all keys/values in float."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, kv, slots, dim, generator=g) * 3 + 1  # an offset, as real keys have
    v = torch.randn(b, kv, slots, dim, generator=g)
    stored = [t for x in (k, v) for t in encode_heads(x, bits, group)]
    return torch.randn(b, heads, dim, generator=g), stored, k, v


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _both(q, stored, k, v, pad, pos, bits, scale):
    """(native output, reference output, native cache, reference cache); the new key/value are
    the float ones at ``pos``."""
    new = (k[:, :, pos].contiguous(), v[:, :, pos].contiguous())
    mine, theirs = [t.clone() for t in stored], [t.clone() for t in stored]
    got = torch.ops.lowbit_cpu.attend_codes(q, *new, *mine, pad, pos, bits, scale)
    ref = attend_codes_reference(q, *new, *theirs, pad, pos, bits, scale)
    return got, ref, mine, theirs


@needs_native
@pytest.mark.parametrize(
    "b,heads,kv,dim,slots,pos,bits,group",
    [(1, 9, 3, 64, 700, 699, 4, 32), (2, 4, 2, 16, 40, 32, 4, 8), (3, 4, 4, 128, 600, 499, 8, 64),
     (1, 2, 1, 12, 9, 8, 4, 4), (2, 6, 2, 96, 300, 298, 3, 96), (1, 4, 2, 64, 5, 0, 4, 32),
     (1, 4, 2, 64, 400, 399, 6, 16), (2, 4, 2, 32, 30, 20, 2, 32), (1, 8, 1, 64, 70, 66, 4, 8),
     (2, 4, 1, 128, 45, 41, 4, 128)],
)  # fmt: skip
def test_native_matches_reference(b, heads, kv, dim, slots, pos, bits, group):
    """The same codes stored and the same output: GQA (1 to 8 query heads per key head), left
    padding, 2 to 8 bits, head sizes and groups the vector path takes and the others, the
    threaded long-context split, a context of one slot."""
    q, stored, k, v = _case(b, heads, kv, dim, slots, bits, group)
    k[0, 0, pos, :group] = 0.5  # a group of equal values (zero width: scale 1)
    pad = torch.tensor([0, 3, 1][:b]).clamp_max(pos)
    got, ref, mine, theirs = _both(q, stored, k, v, pad, pos, bits, dim**-0.5)
    assert got.shape == (b, heads, dim)
    assert all(torch.equal(m, t) for m, t in zip(mine, theirs, strict=True))
    assert _rel(got, ref) < 1e-5


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.25)])
def test_attention_over_codes_follows_the_float_values(bits, tol):
    """Codes of 8 bits give nearly the float attention, 4 bits a rougher one (the wrapper:
    native where built, else the reference)."""
    q, stored, k, v = _case(2, 6, 2, 32, 50, bits, 32, seed=1)
    pad = torch.tensor([0, 4])
    got = attend_codes(q, k[:, :, 49].contiguous(), v[:, :, 49].contiguous(), *stored, pad, 49,
                       bits, 32**-0.5)  # fmt: skip
    mask = (torch.arange(50).unsqueeze(0) >= pad.unsqueeze(1))[:, None, None]
    ref = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask,
                                         scale=32**-0.5, enable_gqa=True).squeeze(2)  # fmt: skip
    assert _rel(got, ref) < tol


def test_a_strided_cache_takes_the_reference():
    """Rows of a larger cache (a view that is not contiguous) are written through the view and
    give the result the same rows give alone."""
    q, stored, k, v = _case(3, 4, 2, 16, 20, 4, 16)
    new = (k[::2, :, 19], v[::2, :, 19])
    pad = torch.tensor([0, 2])
    views = [t[::2] for t in stored]  # rows 0 and 2 of every tensor
    assert not views[0].is_contiguous()
    alone = [t.clone().contiguous() for t in views]
    got = attend_codes(q[::2], *new, *views, pad, 19, 4, 0.25)
    ref = attend_codes(q[::2].contiguous(), *(x.contiguous() for x in new), *alone, pad, 19, 4,
                       0.25)  # fmt: skip
    assert _rel(got, ref) < 1e-5
    assert all(torch.equal(t[::2], a) for t, a in zip(stored, alone, strict=True))


@needs_native
def test_bad_calls_are_refused():
    q, stored, k, v = _case(1, 2, 1, 16, 8, 4, 16)
    new = (k[:, :, 0].contiguous(), v[:, :, 0].contiguous())
    op = torch.ops.lowbit_cpu.attend_codes
    with pytest.raises(RuntimeError, match="outside a cache"):
        op(q, *new, *stored, torch.tensor([0]), 8, 4, 0.25)
    with pytest.raises(RuntimeError, match="no slot"):
        op(q, *new, *stored, torch.tensor([5]), 4, 4, 0.25)
    with pytest.raises(RuntimeError, match="float16"):
        op(q, *new, stored[0], stored[1].float(), *stored[2:], torch.tensor([0]), 4, 4, 0.25)
    with pytest.raises(RuntimeError, match="not finite"):
        op(q, torch.full_like(new[0], float("nan")), new[1], *stored, torch.tensor([0]), 4, 4, 0.25)
