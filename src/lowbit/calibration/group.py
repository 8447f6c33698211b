"""The ranks of a calibration or evaluation job: one process, or a torch.distributed group.

The runner and the evaluators ask this object a few questions: which calibration batches are
mine, who owns (quantizes) a linear, and "reduce these statistics / broadcast this result".
Without a process group every answer is the identity, so one code path serves both. With one
(``torchrun ... -m lowbit quantize``) they are collectives on the tensors where they are: gloo
for CPU tensors, NCCL for CUDA ones where each process has its own GPU.

Sums that decide results are made independent of the number of ranks where that is cheap:
scalars (losses, errors) are gathered per batch and added in batch order on every rank, so 1
and N processes add the same numbers in the same order. Large sums (Hessians) are float64, so
they differ at most in their last bits. Results are sent as one byte buffer with a JSON header
(names, dtypes, shapes): no pickle crosses between ranks.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


class Group:
    """Rank ``rank`` of ``world`` processes; ``world == 1`` makes every collective an identity."""

    def __init__(self, rank: int = 0, world: int = 1, backend: str | None = None) -> None:
        self.rank, self.world, self.backend = rank, world, backend

    @classmethod
    def current(cls) -> Group:
        """The initialised default process group, or one process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), dist.get_backend())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this rank writes outputs and prints reports."""
        return self.rank == 0

    def describe(self) -> dict[str, object]:
        return {"world_size": self.world, "backend": self.backend or "none"}

    # --- who does what -------------------------------------------------------------------------

    def mine(self, count: int) -> list[int]:
        """The indices of ``count`` items (calibration batches, evaluation windows) this rank
        takes: every world-th, so the first few (measured for errors) are spread over ranks."""
        return list(range(self.rank, count, self.world))

    def owners(self, costs: Mapping[str, float]) -> dict[str, int]:
        """name -> rank that does the work, greedily by cost (largest first, to the least
        loaded rank; ties to the lower rank and to the earlier name): the same on every rank."""
        load = [0.0] * self.world
        out: dict[str, int] = {}
        order = {n: i for i, n in enumerate(costs)}
        for name in sorted(costs, key=lambda n: (-costs[n], order[n])):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            out[name] = rank
            load[rank] += costs[name]
        return {n: out[n] for n in costs}

    # --- collectives ---------------------------------------------------------------------------

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over ranks, in place."""
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def max(self, t: Tensor) -> Tensor:
        """``t`` element-wise max over ranks, in place."""
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def min_int(self, value: int) -> int:
        return int(self._all_reduce(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MIN))

    def max_int(self, value: int) -> int:
        return int(self._all_reduce(torch.tensor([value], dtype=torch.int64), dist.ReduceOp.MAX))

    def reduce_to(self, t: Tensor, dst: int) -> Tensor | None:
        """``t`` summed over ranks on rank ``dst`` (other ranks: None)."""
        if not self.distributed:
            return t
        dist.reduce(t, dst, dist.ReduceOp.SUM)
        return t if self.rank == dst else None

    def ordered_sum(self, values: Mapping[int, float], count: int) -> list[float]:
        """Scalars of items 0..count-1, each held by one rank (``values``: mine), gathered so
        that every rank holds all of them in item order (adding zeros is exact)."""
        vec = torch.zeros(count, dtype=torch.float64)
        for i, v in values.items():
            vec[i] = v
        return self.sum(vec).tolist()

    def broadcast(self, tensors: Mapping[str, Tensor] | None, src: int) -> dict[str, Tensor]:
        """Rank ``src``'s named tensors on every rank (CPU, contiguous copies on receivers)."""
        if not self.distributed:
            return dict(tensors or {})
        if self.rank == src:
            header, payload = _encode(tensors or {})
            sizes = torch.tensor([len(header), payload.numel()], dtype=torch.int64)
        else:
            sizes = torch.zeros(2, dtype=torch.int64)
        sizes = self._broadcast(sizes, src)
        if self.rank == src:
            buf = torch.cat([torch.frombuffer(bytearray(header), dtype=torch.uint8), payload])
        else:
            buf = torch.empty(int(sizes.sum()), dtype=torch.uint8)
        buf = self._broadcast(buf, src)
        if self.rank == src:
            return dict(tensors or {})
        return _decode(buf, int(sizes[0]))

    def gather(self, tensors: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """Every rank's named tensors, by rank, on every rank."""
        return [self.broadcast(tensors if r == self.rank else None, r) for r in range(self.world)]

    def check_same(self, parts: Mapping[str, object], what: str = "arguments") -> None:
        """Refuse, on every rank at once, a job whose ranks were started differently: ``parts``
        (JSON-able, e.g. recipe, seed, calibration tokens) must be equal on all of them. Ranks
        that disagree would otherwise wait on each other's mismatched collectives until the
        timeout. Only hashes cross between ranks."""
        if not self.distributed:
            return
        names = sorted(parts)
        if self.min_int(len(names)) != self.max_int(len(names)):
            raise LowbitError("the ranks run different lowbit versions: install the same one "
                              "on every host")  # fmt: skip
        rows = [hashlib.sha256(json.dumps(parts[n], sort_keys=True, default=str).encode()).digest()
                for n in names]  # fmt: skip
        mine = torch.tensor([list(r) for r in rows], dtype=torch.uint8).reshape(len(names), 32)
        differs = (self._broadcast(mine.clone(), 0) != mine).any(dim=1)
        keys = self.sum(differs.to(torch.int64))
        ranks = torch.zeros(self.world, dtype=torch.int64)
        ranks[self.rank] = int(differs.any())
        ranks = self.sum(ranks)
        if keys.any():
            bad = ", ".join(str(r) for r in ranks.nonzero().flatten().tolist())
            fields = ", ".join(n for n, k in zip(names, keys.tolist(), strict=True) if k)
            raise LowbitError(f"rank {bad} started with other {what} than rank 0 ({fields}): "
                              f"start every rank with the same command and inputs")  # fmt: skip

    def barrier(self) -> None:
        if self.distributed:
            self.sum(torch.zeros(1))

    # --- plumbing ------------------------------------------------------------------------------

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp) -> Tensor:
        if not self.distributed:
            return t
        dist.all_reduce(t, op)
        return t

    def _broadcast(self, t: Tensor, src: int) -> Tensor:
        dist.broadcast(t, src)
        return t


def _encode(tensors: Mapping[str, Tensor]) -> tuple[bytes, Tensor]:
    """A JSON header (name, dtype, shape, byte offset) and every tensor's bytes, concatenated."""
    parts, meta, offset = [], [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        meta.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset])
        parts.append(raw)
        offset += raw.numel()
    payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return json.dumps(meta).encode(), payload


def _decode(buf: Tensor, header_len: int) -> dict[str, Tensor]:
    meta = json.loads(bytes(buf[:header_len].tolist()))
    payload = buf[header_len:]
    out = {}
    for name, dtype, shape, offset in meta:
        dt = getattr(torch, dtype)
        n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dt).element_size()
        out[name] = payload[offset : offset + n].clone().view(dt).reshape(shape)
    return out


def default_backend() -> str:
    """The process group's backend: gloo for CPU tensors (where lowbit calibrates), and NCCL
    beside it for CUDA tensors when every process on this host has a GPU of its own (NCCL
    refuses two ranks on one GPU); gloo alone otherwise (logged)."""
    if not torch.cuda.is_available():
        return "gloo"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    if local > gpus:
        log.info("%d processes on this host share %d GPU(s): collectives over gloo only",
                 local, gpus)  # fmt: skip
        return "gloo"
    return "cpu:gloo,cuda:nccl"


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> Group:
    """Join the process group ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...), if any; one process otherwise. ``backend`` defaults to
    :func:`default_backend`. A rank that dies makes the others' collectives fail."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return Group()
    if not dist.is_initialized():
        backend = backend or default_backend()
        if "nccl" in backend:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise LowbitError(f"cannot join the process group ({backend}): {exc}") from None
    return Group.current()


def shutdown() -> None:
    """Leave the process group once every rank is done (a rank that tears its connections
    down while another still uses them makes that one fail)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ordered_total(values: Sequence[float]) -> float:
    """The sum of ``values`` added in order (what a single process accumulating batch by batch
    computes)."""
    total = 0.0
    for v in values:
        total += v
    return total
