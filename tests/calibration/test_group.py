"""The process group the runner asks: identities for one process, collectives for several
(two gloo processes on this machine), and the byte format results travel in."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit.calibration.group import (
    Group,
    _decode,
    _encode,
    default_backend,
    init_from_env,
    ordered_total,
)
from lowbit.errors import LowbitError


def test_one_process_keeps_everything_and_changes_nothing():
    g = Group()
    assert not g.distributed and g.main
    assert g.mine(5) == [0, 1, 2, 3, 4]
    assert set(g.owners({"a": 3.0, "b": 1.0}).values()) == {0}
    t = torch.tensor([1.0, 2.0])
    assert g.sum(t) is t and g.reduce_to(t, 0) is t
    assert g.ordered_sum({0: 1.5, 2: 2.5}, 3) == [1.5, 0.0, 2.5]
    assert g.broadcast({"x": t}, 0)["x"] is t
    assert g.describe() == {"world_size": 1, "backend": "none"}


def test_batches_are_dealt_round_robin():
    assert Group(1, 3).mine(7) == [1, 4]
    assert Group(0, 3).mine(7) == [0, 3, 6]
    every = sorted(i for r in range(3) for i in Group(r, 3).mine(7))
    assert every == list(range(7))


def test_owners_are_the_greedy_split_by_cost_and_the_same_on_every_rank():
    costs = {"q": 4.0, "k": 1.0, "v": 1.0, "o": 4.0, "up": 8.0}
    owners = [Group(r, 2).owners(costs) for r in range(2)]
    assert owners[0] == owners[1]
    load = [sum(c for n, c in costs.items() if owners[0][n] == r) for r in range(2)]
    assert load == [9.0, 9.0]  # up (8) and k on one rank, q, o and v on the other
    assert list(owners[0]) == list(costs)


def test_encoded_tensors_come_back_exactly():
    tensors = {
        "codes": torch.randint(-8, 8, (5, 7), dtype=torch.int8),
        "scale": torch.randn(5, 2).to(torch.bfloat16),
        "zero": torch.randint(0, 255, (5, 2), dtype=torch.uint8),
        "half": torch.randn(3).half(),
        "block": torch.tensor([1, 64]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }
    header, payload = _encode(tensors)
    back = _decode(torch.cat([torch.frombuffer(bytearray(header), dtype=torch.uint8), payload]),
                   len(header))  # fmt: skip
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name


def test_ordered_total_adds_in_order():
    values = [1e16, 1.0, -1e16, 1.0]
    assert ordered_total(values) == ((1e16 + 1.0) - 1e16) + 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        g = Group.current()
        out = {"world": (g.rank, g.world, g.backend)}
        out["sum"] = g.sum(torch.tensor([1.0 + rank, 10.0])).tolist()
        out["max"] = g.max(torch.tensor([float(rank), -float(rank)])).tolist()
        got = g.reduce_to(torch.full((2,), float(rank + 1), dtype=torch.float64), 1)
        out["reduce"] = None if got is None else got.tolist()
        out["min"], out["maxi"] = g.min_int(5 + rank), g.max_int(5 + rank)
        out["ordered"] = g.ordered_sum({i: float(i) for i in g.mine(5)}, 5)
        sent = {"codes": torch.arange(6, dtype=torch.int8).reshape(2, 3) * (rank + 1)}
        out["bcast"] = g.broadcast(sent if rank == 1 else None, 1)["codes"].tolist()
        out["gather"] = [d["codes"].tolist() for d in g.gather(sent)]
        out["nothing"] = g.broadcast(None, 0)
        g.check_same({"recipe": "w4", "seed": 1})  # the same everywhere: passes
        try:
            g.check_same({"recipe": "w4", "seed": rank, "model": {"config": "{}"}})
        except LowbitError as exc:
            out["differ"] = str(exc)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_processes_reduce_broadcast_and_gather():
    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(2, _free_port(), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert r0["world"] == (0, 2, "gloo") and r1["world"] == (1, 2, "gloo")
    for r in (r0, r1):
        assert r["sum"] == [3.0, 20.0] and r["max"] == [1.0, 0.0]
        assert (r["min"], r["maxi"]) == (5, 6)
        assert r["ordered"] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert r["bcast"] == [[0, 2, 4], [6, 8, 10]]
        assert r["gather"] == [[[0, 1, 2], [3, 4, 5]], [[0, 2, 4], [6, 8, 10]]]
        assert r["nothing"] == {}
        assert r["differ"] == (
            "rank 1 started with other arguments than rank 0 (seed): start "
            "every rank with the same command and inputs"
        )
    assert r0["reduce"] is None and r1["reduce"] == [3.0, 3.0]


def test_a_job_with_fewer_batches_than_processes_is_refused_on_every_rank():
    from lowbit.calibration import run_sequential
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="1 calibration batches for 2 processes"):
        run_sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList(), "layers",
                       torch.zeros(3, 4, dtype=torch.long), lambda ctx: None, batch_size=8,
                       progress=False, group=Group(1, 2))  # fmt: skip


@pytest.mark.parametrize(
    ("gpus", "local", "expected"),
    [(0, 2, "gloo"), (1, 1, "cpu:gloo,cuda:nccl"), (1, 2, "gloo"), (2, 2, "cpu:gloo,cuda:nccl")],
)
def test_nccl_only_where_every_process_of_the_host_has_a_gpu(monkeypatch, gpus, local, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    assert default_backend() == expected


def _joined(rank: int, world: int, port: int, results) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    g = init_from_env(timeout_s=60)
    try:
        device = "cuda" if "nccl" in g.backend else "cpu"
        on = {"cpu": torch.tensor([1.0 + rank])}
        if device == "cuda":  # CUDA tensors go over NCCL, CPU ones over gloo, in one group
            on["cuda"] = torch.tensor([1.0 + rank], device="cuda")
        out = {k: (g.sum(t).item(), t.device.type) for k, t in on.items()}
        out["backend"] = g.backend
        out["bcast"] = g.broadcast({"c": torch.tensor([rank + 7])} if rank else None, 1)[
            "c"
        ].tolist()
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_a_job_joined_from_the_environment_sums_where_its_tensors_are():
    """gloo on a CPU machine or where processes share a GPU; with a GPU per process, CUDA
    tensors are summed over NCCL in the same group (only on a machine with two GPUs)."""
    results = mp.Manager().dict()
    mp.spawn(_joined, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        assert r["cpu"] == (3.0, "cpu") and r["bcast"] == [8]
        if torch.cuda.device_count() >= 2:
            assert r["backend"] == "cpu:gloo,cuda:nccl" and r["cuda"] == (3.0, "cuda")
        else:
            assert r["backend"] == "gloo" and "cuda" not in r
