"""``python -m lowbit``: the command line, as ``torchrun -m lowbit quantize ...`` starts it."""

import sys

from lowbit.cli import main

sys.exit(main())
