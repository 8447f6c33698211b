"""torch's ops held to one thread while lowbit's pooled kernels keep torch's former count."""

import pytest
import torch

from helpers import torch_threads
from lowbit.kernels.build import native_ops
from lowbit.kernels.threads import torch_ops_on_one_thread
from lowbit.primitives.kv import encode_heads

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


def _pool_threads() -> int:
    held = torch.ops.lowbit_cpu.set_kernel_threads(0)
    torch.ops.lowbit_cpu.set_kernel_threads(held)
    return held


@needs_native
def test_torch_takes_one_thread_and_the_pool_keeps_the_count():
    if torch.ops.lowbit_cpu.decode_threads() != "spin pool":
        pytest.skip("OpenMP runs the kernels here (its threads set never to sleep)")
    with torch_threads(2):
        assert _pool_threads() == 0  # follows torch's count
        with torch_ops_on_one_thread():
            assert torch.get_num_threads() == 1
            assert _pool_threads() == 2
            x, w = torch.randn(1, 576), torch.randn(1000, 576)
            inside = torch.ops.lowbit_cpu.float_linear(x, w)
        assert torch.get_num_threads() == 2 and _pool_threads() == 0
        assert torch.equal(inside, torch.ops.lowbit_cpu.float_linear(x, w))
        with pytest.raises(RuntimeError, match="boom"), torch_ops_on_one_thread():
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2 and _pool_threads() == 0  # restored on errors


@needs_native
def test_on_one_thread_nothing_changes():
    with torch_threads(1), torch_ops_on_one_thread():
        assert torch.get_num_threads() == 1 and _pool_threads() == 0
    with torch_threads(2), torch_ops_on_one_thread(when=False):
        assert torch.get_num_threads() == 2 and _pool_threads() == 0


def _attend(op, args: list) -> torch.Tensor:
    cache = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]  # (written to)
    return op(*cache)


def _attention_args(kind: str) -> tuple:
    """One layer's decode attention at 400 slots, 9 query heads on 3 KV heads: over a float32
    cache, or over a cache of 4-bit codes."""
    g = torch.Generator().manual_seed(0)
    heads, kv, dim, pos = 9, 3, 64, 400
    k, v = (torch.randn(1, kv, pos + 1, dim, generator=g) for _ in range(2))
    ang = torch.arange(pos + 1).unsqueeze(1) * torch.linspace(0.01, 1, dim).unsqueeze(0)
    qkv, none = torch.randn(1, (heads + 2 * kv) * dim, generator=g), torch.empty(0)
    rest = [ang.cos(), ang.sin(), torch.tensor([0]), pos, heads, kv, dim**-0.5, none, none, 1e-6]
    if kind == "float":
        return torch.ops.lowbit_cpu.decode_attention, [qkv, k, v, *rest]
    stored = [t for x in (k, v) for t in encode_heads(x, 4, 32)]
    return torch.ops.lowbit_cpu.decode_attention_codes, [qkv, *stored, *rest, none, none, 4, 0]


@needs_native
@pytest.mark.parametrize("kind", ["float", "codes"])
def test_attention_splits_a_long_context_over_the_pools_threads(kind):
    """While torch is held to one thread, decode attention (over a float cache and over a cache
    of codes) cuts a long context into as many ranges as the pool has threads (not torch's one,
    which left two threads to share three KV heads 2:1): bit for bit what it computes with
    torch on those threads."""
    if torch.ops.lowbit_cpu.decode_threads() != "spin pool":
        pytest.skip("OpenMP runs the kernels here (its threads set never to sleep)")
    op, args = _attention_args(kind)
    with torch_threads(1):
        one = _attend(op, args)
    with torch_threads(2):
        two = _attend(op, args)
        with torch_ops_on_one_thread():
            held = _attend(op, args)
    assert not torch.equal(one, two)  # one range and two sum in different orders
    assert torch.equal(held, two)
