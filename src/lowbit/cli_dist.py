"""Running a command as one rank of a ``torchrun`` job.

``torchrun --nproc-per-node N -m lowbit quantize ...`` starts N copies of the command with
RANK / WORLD_SIZE / MASTER_ADDR in their environment; each joins the process group
(:func:`lowbit.calibration.group.default_backend`) before its command runs and leaves it
after. Rank 0 prints and writes; the other ranks keep quiet (no progress bars, no summary) and
report only their errors, naming their rank.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from lowbit.assets import hidden_stem
from lowbit.calibration.group import Group, init_from_env, shutdown
from lowbit.errors import LowbitError


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


DIST_COMMANDS = ("quantize", "eval", "analyze")  # the commands that split their work
PER_PROCESS = ("func", "parser", "threads", "quiet", "verbose", "dist_timeout")  # not compared


@contextlib.contextmanager
def joined(args: argparse.Namespace) -> Iterator[Group]:
    """The process group the environment describes, joined for the command's lifetime. Before
    anything else every rank checks that the command splits its work over processes (any
    other one would run N times and race on its output) and that all ranks were started with
    the same arguments (ranks that disagree would wait in different collectives until the
    timeout, or add up figures of different windows)."""
    if not launched():
        yield Group()
        return
    command = args.func.__name__.removeprefix("cmd_")
    if command not in DIST_COMMANDS:
        raise LowbitError(f"lowbit {command} runs in one process; run it without torchrun "
                          f"(under torchrun: {', '.join(DIST_COMMANDS)})")  # fmt: skip
    group = init_from_env(timeout_s=args.dist_timeout)
    try:
        group.check_same({k: v for k, v in vars(args).items() if k not in PER_PROCESS})
    except LowbitError:
        shutdown()
        raise
    devnull = None
    if not group.main:
        args.quiet = True
        logging.getLogger().setLevel(logging.WARNING)
        devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
        sys.stdout = devnull
    failed = True
    try:
        yield group
        failed = False
    finally:
        if devnull is not None:
            sys.stdout = sys.__stdout__
            devnull.close()
        if not failed:  # tearing down a group whose peer died aborts the process
            shutdown()


def rank_label() -> str:
    """`` (rank R)`` in a job of several processes, for error lines."""
    return f" (rank {os.environ.get('RANK', '?')})" if launched() else ""


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.distributed's report of a peer that died or stopped answering
    (NCCL: a DistError; gloo: a RuntimeError from its transport)."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and launched() and "gloo" in str(exc)


def require_shared(folder: Path, why: str) -> None:
    """Refuse, on every rank before any work, a ``folder`` that the ranks do not all see: rank 0
    writes a probe file with a random token beside it and every rank reads it back (``why``: the
    flag that needs the folder shared, for the error line)."""
    group = Group.current()
    if not group.distributed:
        return
    probe = folder.parent / f"{hidden_stem(folder)}.lowbit-probe"
    token = secrets.randbits(62)  # not torch's generator: seeded runs stay as they were
    if group.main:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text(str(token), encoding="utf-8")
        except OSError:
            token = -1
    sent = group.broadcast({"token": torch.tensor([token])} if group.main else None, 0)
    token = int(sent["token"])
    if token < 0:
        raise LowbitError(f"rank 0 cannot write beside {folder}: choose another folder")
    try:
        seen = probe.read_text(encoding="utf-8") == str(token)
    except OSError:
        seen = False
    try:
        everywhere = group.min_int(int(seen))
    finally:
        if group.main:
            probe.unlink(missing_ok=True)
    if not everywhere:
        raise LowbitError(f"{why} under torchrun reads {folder} on every host, and not every "
                          f"rank sees rank 0's files there: put it on a file system all hosts "
                          f"share, or drop {why} and evaluate afterwards")  # fmt: skip
