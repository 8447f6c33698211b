"""The fused decode-step ops against their plain-PyTorch references."""

import pytest
import torch

from lowbit.kernels import decode
from lowbit.kernels.build import native_ops

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


def close(got, ref, tol=1e-5):
    return torch.allclose(got, ref, rtol=tol, atol=tol * max(ref.abs().max().item(), 1.0))


@needs_native
@pytest.mark.parametrize("shape", [(1, 576), (3, 64), (2, 1, 100), (2, 300, 576)])
def test_norms_and_silu_match_reference(shape):  # the last: a prompt's rows over threads
    g = torch.Generator().manual_seed(shape[-1])
    x, d = torch.randn(shape, generator=g) * 5, torch.randn(shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    ref = decode.rms_norm_reference(x, w, 1e-5)
    assert close(torch.ops.lowbit_cpu.rms_norm(x, w, 1e-5), ref)
    x_ref, x_nat = x.clone(), x.clone()
    ref = decode.rms_norm_reference(x_ref.add_(d), w, 1e-5)
    got = torch.ops.lowbit_cpu.add_rms_norm(x_nat, d, w, 1e-5)
    assert close(got, ref) and close(x_nat, x_ref)  # the residual is updated in place
    gu = torch.randn(*shape[:-1], 2 * shape[-1], generator=g)
    gate, up = gu.chunk(2, dim=-1)
    assert close(torch.ops.lowbit_cpu.silu_mul(gu), torch.nn.functional.silu(gate) * up)


@needs_native
def test_silu_mul_at_extreme_gates():
    """Gates far past exp's range (either sign), zero and NaN, 8 at a time and in the tail."""
    gate = torch.tensor([-1e4, -100, -88, -87.5, -20, -1, 0, 1, 20, 88, 100, 1e4, float("nan"),
                         3, -3, 0.5, 7])  # fmt: skip
    up = torch.linspace(-2, 2, gate.numel())
    got = torch.ops.lowbit_cpu.silu_mul(torch.cat([gate, up]).view(1, -1))[0]
    want = torch.nn.functional.silu(gate) * up
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.allclose(got.nan_to_num(), want.nan_to_num(), rtol=1e-6, atol=1e-30)
    # gates near float32's largest, 8 at a time and in the tail (gave -1.816 for -3e38)
    gate = torch.tensor([-1e36, -1e38, -3e38, float("-inf"), -89, -1e30, float("inf"), 1e38,
                         -3e38])  # fmt: skip
    up = torch.full_like(gate, 2.0)
    got = torch.ops.lowbit_cpu.silu_mul(torch.cat([gate, up]).view(1, -1))[0]
    want = torch.nn.functional.silu(gate) * up
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("b", "t", "heads", "kv", "dim"), [(1, 300, 9, 3, 64), (2, 5, 4, 2, 16)])
def test_prompt_rope_matches_the_reference(b, t, heads, kv, dim, qk_norm, native, monkeypatch):
    """rope_qk: q and k heads normed and rotated in place by the native op (over threads for a
    prompt's rows) as rms_norm + rotate do; v untouched."""
    if native and not native_ops():
        pytest.skip("native kernels unavailable here")
    if not native:
        monkeypatch.setattr(decode, "_native", lambda *t: False)
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(b, t, (heads + 2 * kv) * dim, generator=g)
    ang = torch.arange(t).unsqueeze(1) * torch.linspace(0.01, 1, dim).unsqueeze(0)
    cos, sin = ang.cos(), ang.sin()
    qn, kn = (torch.rand(dim, generator=g) + 0.5, torch.rand(dim, generator=g)) if qk_norm else (
        None, None)  # fmt: skip
    q, k, v = qkv.split([heads * dim, kv * dim, kv * dim], dim=-1)
    q, k = q.reshape(b, t, heads, dim), k.reshape(b, t, kv, dim)
    if qk_norm:
        q, k = decode.rms_norm_reference(q, qn, 1e-6), decode.rms_norm_reference(k, kn, 1e-6)
    want = (decode.rotate(q.transpose(1, 2), cos, sin), decode.rotate(k.transpose(1, 2), cos, sin),
            v.reshape(b, t, kv, dim).transpose(1, 2).clone())  # fmt: skip
    got = decode.rope_qk(qkv, cos, sin, heads, kv, qn, kn, 1e-6)
    for a, e in zip(got, want, strict=True):
        assert a.shape == e.shape and close(a, e)
    assert torch.equal(got[2], want[2])


@needs_native
def test_prompt_rope_refuses_rows_that_are_not_heads():
    qkv = torch.randn(1, 4, 7 * 16 + 1)
    cos = sin = torch.ones(4, 16)
    with pytest.raises(RuntimeError, match="heads of an even size"):
        torch.ops.lowbit_cpu.rope_qk(qkv, cos, sin, 3, 2, torch.empty(0), torch.empty(0), 1e-6)
    with pytest.raises(RuntimeError, match="cos and sin"):
        torch.ops.lowbit_cpu.rope_qk(qkv[..., :-1].contiguous(), cos[:3], sin[:3], 3, 2,
                                     torch.empty(0), torch.empty(0), 1e-6)  # fmt: skip


def _attention_case(b, heads, kv, dim, pos, qk_norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    cap = pos + 5
    qkv = torch.randn(b, (heads + 2 * kv) * dim, generator=g)
    kc, vc = torch.randn(b, kv, cap, dim, generator=g), torch.randn(b, kv, cap, dim, generator=g)
    ang = torch.arange(cap).unsqueeze(1) * torch.linspace(0.01, 1, dim).unsqueeze(0)
    cos, sin = ang.cos(), ang.sin()
    pad = torch.tensor([0, 3, 1][:b])
    norms = [torch.rand(dim, generator=g) + 0.5 for _ in range(2)] if qk_norm else [
        torch.empty(0), torch.empty(0)]  # fmt: skip
    return [qkv, kc, vc, cos, sin, pad, pos, heads, kv, dim**-0.5, *norms, 1e-6]


@needs_native
def test_decode_attention_refuses_what_it_cannot_read():
    """Padding past the slot or before the cache, a padding per row missing, norms of another
    size, tables of another width: errors (a negative padding segfaulted, the rest read past
    their tensors)."""
    import re

    def call(change):
        args = _attention_case(3, 4, 2, 16, 7, True)
        change(args)
        torch.ops.lowbit_cpu.decode_attention(*args)

    cases = {
        "has no slot to attend to": [lambda a: a.__setitem__(5, torch.tensor([0, -3, 1])),
                                     lambda a: a.__setitem__(5, torch.tensor([0, 8, 1]))],
        "(B) padding": [lambda a: a.__setitem__(5, torch.tensor([0]))],
        "norms of D weights": [lambda a: a.__setitem__(10, torch.ones(1))],
        "(T, D) cos and sin": [lambda a: a.__setitem__(3, a[3][:, :8].contiguous())],
    }  # fmt: skip
    for says, changes in cases.items():
        for change in changes:
            with pytest.raises(RuntimeError, match=re.escape(says)):
                call(change)
    call(lambda a: a.__setitem__(5, torch.tensor([0, 7, 1])))  # one slot: attended to


@needs_native
@pytest.mark.parametrize("b,heads,kv,dim,pos", [(1, 9, 3, 64, 40), (3, 4, 2, 16, 7),
                                                (2, 4, 4, 32, 300), (1, 2, 1, 8, 0),
                                                (1, 4, 2, 128, 70),
                                                (2, 6, 2, 96, 300)])  # fmt: skip
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("stored", [torch.float32, torch.float16])
def test_decode_attention_matches_reference(b, heads, kv, dim, pos, qk_norm, stored):
    """Same output and the same cache writes (GQA, left padding, Qwen3's q/k norms, a context
    long enough for the threaded path), over a float32 cache and a float16 one (kv_bits 16)."""
    args = _attention_case(b, heads, kv, dim, pos, qk_norm)
    args[1], args[2] = args[1].to(stored), args[2].to(stored)
    ref_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    ref = decode.decode_attention_reference(*ref_args)
    got = torch.ops.lowbit_cpu.decode_attention(*args)
    assert got.shape == (b, heads * dim)
    assert close(got, ref)
    # keys: RoPE's float32 sums may differ in the last bit, then rounded to float16 or not
    key_tol = 1e-3 if stored == torch.float16 else 1e-5
    assert close(args[1].float(), ref_args[1].float(), key_tol)
    assert torch.equal(args[2], ref_args[2])


@needs_native
def test_a_float16_cache_is_written_clamped_as_the_reference_writes_it():
    """Keys and values beyond float16's range are stored as ±65504 (not infinity), NaN as NaN,
    by the native op and its reference alike."""
    args = _attention_case(1, 2, 1, 16, 3, False)
    args[1], args[2] = args[1].half(), args[2].half()
    args[3], args[4] = torch.ones_like(args[3]), torch.zeros_like(args[4])  # RoPE: identity
    args[0][0, 32:48] = torch.tensor([1e6, -1e6, float("nan"), 2.0] * 4)  # the key
    args[0][0, 48:64] = torch.tensor([-1e6, 1e6, 0.5, float("nan")] * 4)  # the value
    ref_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    decode.decode_attention_reference(*ref_args)
    torch.ops.lowbit_cpu.decode_attention(*args)
    for got, want in ((args[1], ref_args[1]), (args[2], ref_args[2])):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert args[1][0, 0, 3, :4].tolist()[:2] == [65504.0, -65504.0]


@needs_native
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_long_contexts_split_over_threads_combine_exactly(threads):
    """A long context is cut into one range of slots per thread and the ranges' softmaxes are
    combined; a row whose padding leaves fewer slots than ranges gets empty ranges."""
    args = _attention_case(2, 6, 2, 64, 400, False, seed=3)
    args[5] = torch.tensor([0, 398])  # the second row attends to 3 slots only
    ref = decode.decode_attention_reference(*[a.clone() if isinstance(a, torch.Tensor) else a
                                              for a in args])  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = torch.ops.lowbit_cpu.decode_attention(*args)
    finally:
        torch.set_num_threads(before)
    assert close(got, ref)


def test_reference_path_when_native_is_off(monkeypatch):
    """The wrappers fall back to the references (what runs without the built kernels)."""
    monkeypatch.setattr(decode, "_native", lambda *t: False)
    args = _attention_case(2, 4, 2, 16, 5, False)
    expect = decode.decode_attention_reference(*[a.clone() if isinstance(a, torch.Tensor) else a
                                                 for a in args])  # fmt: skip
    assert torch.equal(decode.decode_attention(*args), expect)
    x = torch.randn(2, 8)
    assert torch.equal(decode.silu_mul(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])
