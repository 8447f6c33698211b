"""``lowbit`` as one rank of a torchrun job, killed (SIGKILL) on rank DIE_RANK as soon as it
has finished block DIE_AFTER: what a crashed host looks like to the other ranks.

    DIE_RANK=1 DIE_AFTER=0 torchrun --nproc-per-node 2 tests/dist/die.py quantize ...

With FAIL_FINISH=1 instead, rank 0 fails to assemble the folder (a full disk, say).
"""

from __future__ import annotations

import os
import signal
import sys

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models.workdir import WorkFolder
from lowbit.pipeline.stream import StreamStore


def _dying_leave(leave):
    def wrapped(self, index, *args, **kwargs):
        leave(self, index, *args, **kwargs)
        if self.group.rank == int(os.environ["DIE_RANK"]) and index == int(os.environ["DIE_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

    return wrapped


def _failing_finish(self, *args, **kwargs):
    raise LowbitError("no space left on device (simulated)")


if __name__ == "__main__":
    if "DIE_RANK" in os.environ:
        StreamStore.leave = _dying_leave(StreamStore.leave)
    if "FAIL_FINISH" in os.environ:
        WorkFolder.finish = _failing_finish
    sys.exit(main(sys.argv[1:]))
