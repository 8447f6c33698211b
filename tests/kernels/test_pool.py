"""The decode kernels' thread pool (csrc/pool.h): same results on any thread count, from two
threads at once, after fork, with workers that sleep after every call, beside OpenMP's."""

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch

from lowbit.kernels.build import native_ops

needs_native = pytest.mark.skipif(not native_ops(), reason="native kernels unavailable here")


def _gemv(seed: int, n: int = 1000, k: int = 576) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, k, generator=g), torch.randn(n, k, generator=g)


@needs_native
def test_results_do_not_depend_on_the_thread_count():
    x, w = _gemv(0)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 2):  # the pool is rebuilt for each count
            torch.set_num_threads(threads)
            outs.append(torch.ops.lowbit_cpu.float_linear(x, w))
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])  # each output is one thread's sum, in one order
    assert torch.allclose(outs[0], x @ w.T, rtol=1e-5, atol=1e-4)


@needs_native
def test_tasks_of_different_chunk_counts_back_to_back():
    """Calls cut into 1, 2, 3 and 4 chunks in turn, many times, on 4 threads (more than this
    machine's cores, so workers lose theirs mid-task): each result equals its first."""
    cases = [_gemv(10 + n, n=n) for n in (16, 32, 48, 64, 1000)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        expected = [torch.ops.lowbit_cpu.float_linear(x, w) for x, w in cases]
        for _ in range(400):
            for (x, w), want in zip(cases, expected, strict=True):
                assert torch.equal(torch.ops.lowbit_cpu.float_linear(x, w), want)
    finally:
        torch.set_num_threads(before)
    for (x, w), want in zip(cases, expected, strict=True):
        assert torch.allclose(want, x @ w.T, rtol=1e-5, atol=1e-4)


@needs_native
def test_two_threads_calling_at_once_get_their_own_results():
    cases = [_gemv(seed) for seed in (1, 2)]
    expected = [torch.ops.lowbit_cpu.float_linear(x, w) for x, w in cases]
    bad = []

    def run(i: int) -> None:
        x, w = cases[i]
        for _ in range(300):
            if not torch.equal(torch.ops.lowbit_cpu.float_linear(x, w), expected[i]):
                bad.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert bad == []


def _child(queue) -> None:
    x, w = _gemv(3)
    queue.put(torch.ops.lowbit_cpu.float_linear(x, w).tolist())


@needs_native
@pytest.mark.skipif(sys.platform != "linux", reason="fork is a Linux start method here")
def test_a_forked_child_gets_a_fresh_pool():
    x, w = _gemv(3)
    expected = torch.ops.lowbit_cpu.float_linear(x, w)  # the parent's pool has workers now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    got = queue.get(timeout=120)  # the parent's workers do not exist in the child: no hang
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got == expected.tolist()


SCRIPT = """
import torch
from lowbit.kernels.build import native_ops
assert native_ops()
torch.set_num_threads(2)
g = torch.Generator().manual_seed(4)
x, w = torch.randn(1, 576, generator=g), torch.randn(700, 576, generator=g)
first = torch.ops.lowbit_cpu.float_linear(x, w)
for _ in range(500):  # with LOWBIT_SPIN_US=0 the worker sleeps between calls: a lost wake hangs
    assert torch.equal(torch.ops.lowbit_cpu.float_linear(x, w), first)
assert torch.allclose(first, x @ w.T, rtol=1e-5, atol=1e-4)
print("ok")
"""


@needs_native
@pytest.mark.parametrize(
    "env", [{"LOWBIT_SPIN_US": "0"}, {"LOWBIT_SPIN_US": "soon"}, {"OMP_WAIT_POLICY": "active"}]
)
def test_sleeping_workers_and_spinning_openmp(env):
    run = subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"


WAKE = """
import torch
from lowbit.kernels.build import native_ops
assert native_ops()
torch.set_num_threads(4)
g = torch.Generator().manual_seed(5)
cases = [(torch.randn(1, 256, generator=g), torch.randn(n, 256, generator=g)) for n in (16, 32)]
first = [torch.ops.lowbit_cpu.float_linear(x, w) for x, w in cases]
for _ in range(300):  # 2- and 3-chunk tasks wake one or two of three sleeping workers
    for (x, w), want in zip(cases, first):
        assert torch.equal(torch.ops.lowbit_cpu.float_linear(x, w), want)
print("ok")
"""


@needs_native
def test_tasks_of_fewer_chunks_than_sleeping_workers_give_the_same_results():
    run = subprocess.run([sys.executable, "-c", WAKE], env={**os.environ, "LOWBIT_SPIN_US": "0"},
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok"


DECIDES = [({}, "spin pool"), ({"OMP_WAIT_POLICY": "active"}, "openmp"),
           ({"GOMP_SPINCOUNT": "300000"}, "spin pool"), ({"GOMP_SPINCOUNT": "40G"}, "openmp"),
           ({"GOMP_SPINCOUNT": "30000000000"}, "openmp"),
           ({"KMP_BLOCKTIME": "infinite"}, "openmp")]  # fmt: skip


@needs_native
def test_openmp_runs_the_decode_threads_only_where_its_threads_never_sleep():
    """libgomp spins 30 billion times for ACTIVE: a GOMP_SPINCOUNT that large (suffixes too)
    is the same; LLVM OpenMP's KMP_BLOCKTIME=infinite as well. (The choice is read once per
    process: one child per setting, started together.)"""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}  # fmt: skip
    code = "import torch; from lowbit.kernels.build import native_ops; assert native_ops(); "
    code += "print(torch.ops.lowbit_cpu.decode_threads())"
    children = [subprocess.Popen([sys.executable, "-c", code], env={**clean, **env},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for env, _ in DECIDES]  # fmt: skip
    for child, (env, runner) in zip(children, DECIDES, strict=True):
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-2000:]
        assert out.strip() == runner, env
