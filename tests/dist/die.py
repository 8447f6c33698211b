"""``lowbit`` as one rank of a torchrun job, killed (SIGKILL) on rank DIE_RANK as soon as it
has finished block DIE_AFTER: what a crashed host looks like to the other ranks.

    DIE_RANK=1 DIE_AFTER=0 torchrun --nproc-per-node 2 tests/dist/die.py quantize ...
"""

from __future__ import annotations

import os
import signal
import sys

from lowbit.cli import main
from lowbit.pipeline.stream import StreamStore


def _dying_leave(leave):
    def wrapped(self, index, *args, **kwargs):
        leave(self, index, *args, **kwargs)
        if self.group.rank == int(os.environ["DIE_RANK"]) and index == int(os.environ["DIE_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)

    return wrapped


if __name__ == "__main__":
    if "DIE_RANK" in os.environ:
        StreamStore.leave = _dying_leave(StreamStore.leave)
    sys.exit(main(sys.argv[1:]))
