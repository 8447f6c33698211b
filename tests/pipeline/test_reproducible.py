"""Same model, recipe, calibration and seed in two processes (with different hash seeds, so
dict and set orders differ) write byte-identical weight files, for RTN and for GPTQ."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys, torch
from lowbit import api
from lowbit.calibration import CalibrationSet
windows = torch.randint(0, 50, (6, 24), generator=torch.Generator().manual_seed(1))
calib = CalibrationSet("t", 6, 24, 0, windows)
api.quantize_to(sys.argv[1], "w4-rtn-g32", sys.argv[2] + "/rtn", progress=False)
api.quantize_to(sys.argv[1], "w3-gptq-g32", sys.argv[2] + "/gptq", calib, progress=False)
"""


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("model*"))}  # fmt: skip


def test_two_processes_write_identical_weight_files(tiny_folder, tmp_path):
    children = []
    for hash_seed in ("1", "2"):  # started together: most of each run is its imports
        out = tmp_path / f"run{hash_seed}"
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": hash_seed,
               "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
        children.append((subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_folder),
                                           str(out)], env=env), out))  # fmt: skip
    runs = []
    for child, out in children:
        assert child.wait(timeout=300) == 0
        runs.append(digests(out))
    assert runs[0] == runs[1]
    assert {"rtn/model.safetensors", "gptq/model.safetensors"} <= runs[0].keys()
