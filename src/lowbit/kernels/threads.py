"""torch's own ops on one thread for a while, lowbit's kernels on the threads torch had.

lowbit's decode kernels run on a pool of spinning threads (``csrc/pool.h``); torch's ops run
on OpenMP's, which spin too for a while after each parallel region. In a decode step that
mixes the two (a mixture-of-experts block: the model's router is a torch GEMV, its experts
lowbit's kernels), OpenMP's threads were still spinning on the cores when the experts' GEMVs
started, and those ran at about half speed on 2 cores. One token's router and small ops gain
nothing from threads, so :func:`torch_ops_on_one_thread` holds torch to one thread around
such a step and tells the pool to keep torch's former count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lowbit.kernels.build import native_ops


@contextmanager
def torch_ops_on_one_thread(when: bool = True) -> Iterator[None]:
    """Within the block, torch's ops run on one thread and lowbit's pooled kernels on as many
    as torch had. A no-op unless ``when``, on one thread, without the native kernels, or where
    OpenMP runs the kernels too (its threads set never to sleep: ``decode_threads()``)."""
    threads = torch.get_num_threads()
    if not when or threads == 1 or not native_ops() or \
            torch.ops.lowbit_cpu.decode_threads() != "spin pool":  # fmt: skip
        yield
        return
    before = torch.ops.lowbit_cpu.set_kernel_threads(threads)  # (this thread's calls only)
    try:
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(threads)
        torch.ops.lowbit_cpu.set_kernel_threads(before)
