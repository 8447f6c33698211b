"""torch's ops held to one thread while lowbit's pooled kernels keep torch's former count."""

import pytest
import torch

from helpers import torch_threads
from lowbit.kernels.build import native_ops
from lowbit.kernels.threads import torch_ops_on_one_thread

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
