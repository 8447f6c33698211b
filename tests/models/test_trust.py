"""No code from a model folder ever runs: a folder whose config.json and tokenizer point at
their own Python (``auto_map``) is refused with one line, with "y" waiting on stdin, and the
folder's code never executes (it would leave a marker file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.cli import main

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evilnet"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def poison(folder: Path, marker: Path) -> None:
    """Make ``folder`` ask for its own code to be run (as a hostile hub repo would)."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evilnet", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig",
                            "AutoModelForCausalLM": "evil.EvilModel"})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    tok = folder / "tokenizer_config.json"
    if tok.is_file():
        data = json.loads(tok.read_text())
        data["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
        tok.write_text(json.dumps(data))


def lowbit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], input="y\ny\n",
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


@pytest.mark.parametrize("kind", ["hf", "lowbit"])
def test_a_folder_asking_to_run_its_code_is_refused(tiny_folder, tmp_path, kind):
    marker = tmp_path / "ran.txt"
    folder = tiny_folder
    if kind == "lowbit":
        folder = tmp_path / "q"
        args = ["quantize", str(tiny_folder), "--recipe", "w4-rtn-g32", "--out", str(folder)]
        assert main([*args, "-q"]) == 0
    poison(folder, marker)
    if kind == "hf":
        done = lowbit("quantize", str(folder), "--recipe", "w4-rtn-g32", "--out",
                      str(tmp_path / "out"), "--json")  # fmt: skip
    else:
        done = lowbit("eval", str(folder), "--tokens", "64", "--seqlen", "32", "--json")
    assert done.returncode == 2, done.stderr
    assert not marker.exists()
    assert done.stdout == ""  # no question printed into --json output
    lines = [x for x in done.stderr.splitlines() if x.startswith("lowbit: error:")]
    assert len(lines) == 1 and str(folder) in lines[0], done.stderr
    assert not (tmp_path / "out").exists()
    shutil.rmtree(folder)
