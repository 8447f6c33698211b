"""`torchrun ... -m lowbit`: the commands as ranks of a job of several processes (gloo, CPU).

Two processes on one host and two "nodes" on localhost (c10d rendezvous) write the folder one
process writes; `eval` under torchrun prints one process's figures; a rank killed mid-run ends
the job within seconds and the same command then resumes from the finished blocks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TEXT

DIE = Path(__file__).parent / "dist" / "die.py"
LAUNCH = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture
def corpora(tmp_path: Path) -> tuple[Path, Path]:
    """Calibration text and a different evaluation text."""
    calib, held = tmp_path / "calib.txt", tmp_path / "held.txt"
    calib.write_text(TEXT * 4)
    held.write_text(" ".join(reversed(TEXT.split())) * 2)
    return calib, held


def quantize_args(folder: Path, calib: Path, out: Path, samples: int = 24) -> list[str]:
    return ["-q", "quantize", str(folder), "--recipe", "w3-gptq-g32", "--calib", str(calib),
            "--calib-samples", str(samples), "--calib-seqlen", "32", "--out", str(out)]  # fmt: skip


def run(cmd: list[str], env: dict | None = None, timeout: float = 180):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip


def one_process(args: list[str]) -> subprocess.CompletedProcess:
    done = run([sys.executable, "-m", "lowbit", "--threads", "1", *args])
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_eval_under_torchrun_prints_one_processs_figures(tiny_folder, tmp_path, corpora):
    """(Two processes writing the folder one process writes: the killed-rank test below.)"""
    _, held = corpora
    one_process(["-q", "quantize", str(tiny_folder), "--recipe", "w4-rtn-g64", "--out",
                 str(tmp_path / "one")])  # fmt: skip
    ev = ["eval", str(tmp_path / "one"), "--ref", str(tiny_folder), "--corpus", str(held),
          "--seqlen", "32", "--tokens", "320", "--json"]  # fmt: skip
    single = json.loads(one_process(ev).stdout)
    many = run([*LAUNCH, "--standalone", "--nproc-per-node", "2", "-m", "lowbit", "-q", *ev])
    assert many.returncode == 0, many.stderr[-3000:]
    lines = [json.loads(line) for line in many.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    for key in ("ppl", "kl", "top1", "predicted"):
        assert lines[0][key] == single[key], key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], node_1: list[str] = (),
              cwds: tuple[Path, Path] | None = None) -> tuple[list[int], list[tuple]]:  # fmt: skip
    """``lowbit ARGS`` as a job of two "nodes" on localhost (node 1 also given ``node_1``; node
    0 and 1 started in ``cwds``): their exit codes and (stdout, stderr), node 1's first."""
    port = str(_free_port())
    nodes = []
    for rank in (1, 0):
        cmd = [*LAUNCH, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
               "--master-addr", "127.0.0.1", "--master-port", port, "-m", "lowbit", *args,
               *(node_1 if rank else [])]  # fmt: skip
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=cwds and cwds[rank]))  # fmt: skip
    outs = [p.communicate(timeout=180) for p in nodes]
    return [p.returncode for p in nodes], outs


@pytest.mark.slow  # CI keeps the single-node torchrun tests; this adds a second "host"
def test_two_nodes_on_localhost_rendezvous_and_write_the_same_folder(tiny_folder, tmp_path,
                                                                     corpora):  # fmt: skip
    calib, _ = corpora
    codes, outs = two_nodes(quantize_args(tiny_folder, calib, tmp_path / "nodes"))
    assert codes == [0, 0], outs[1][1][-3000:]
    one_process(quantize_args(tiny_folder, calib, tmp_path / "one"))
    assert weights(tmp_path / "nodes") == weights(tmp_path / "one")


def test_ranks_started_with_different_arguments_are_refused_at_once(tiny_folder, tmp_path,
                                                                   corpora):  # fmt: skip
    """Not a wait on mismatched collectives until the timeout: every rank says which."""
    calib, _ = corpora
    start = time.monotonic()
    codes, outs = two_nodes(quantize_args(tiny_folder, calib, tmp_path / "nodes"),
                            node_1=["--seed", "7"])  # fmt: skip
    assert time.monotonic() - start < 60
    assert all(code != 0 for code in codes)
    said = "rank 1 started with other arguments than rank 0 (seed)"
    assert said in outs[0][1] and said in outs[1][1], outs[1][1][-3000:]
    assert not (tmp_path / "nodes").exists()
    assert not (tmp_path / ".nodes.lowbit-work").exists()


def test_eval_ranks_with_other_windows_or_only_one_eval_flag_are_refused_at_once(
    tiny_folder, tmp_path, corpora
):
    """Ranks that disagree would add up sums of different windows (figures of no text, exit 0)
    or wait in different collectives until --dist-timeout: every command is compared first."""
    calib, held = corpora
    ev = ["-q", "eval", str(tiny_folder), "--corpus", str(held), "--seqlen", "32", "--tokens",
          "320"]  # fmt: skip
    start = time.monotonic()
    codes, outs = two_nodes(ev, node_1=["--tokens", "256"])
    assert all(code != 0 for code in codes), outs[1][1][-3000:]
    assert "rank 1 started with other arguments than rank 0 (tokens)" in outs[0][1]
    args = quantize_args(tiny_folder, calib, tmp_path / "q")
    codes, outs = two_nodes(args, node_1=["--dry-run"])
    assert all(code != 0 for code in codes) and "(dry_run)" in outs[1][1], outs[1][1][-3000:]
    assert time.monotonic() - start < 90
    assert [p.name for p in tmp_path.iterdir() if "q" in p.name] == []


def test_a_command_that_does_not_split_its_work_is_refused_under_torchrun(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    """Every rank would run it whole and race on its output."""
    from lowbit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code = main(["export", str(tiny_folder), "--format", "onnx", "--out", str(tmp_path / "o")])
    assert code == 2 and "lowbit export runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_with_an_out_folder_the_hosts_do_not_share_is_refused_before_any_work(
    tiny_folder, tmp_path, corpora
):
    """Each "host" starts in its own folder, so a relative --out names two different folders:
    every rank evaluates what rank 0 wrote, so all refuse before quantizing."""
    calib, held = corpora
    hosts = (tmp_path / "host0", tmp_path / "host1")
    for host in hosts:
        host.mkdir()
    args = [*quantize_args(tiny_folder, calib, Path("out")), "--eval", "--eval-corpus",
            str(held), "--eval-seqlen", "32", "--eval-tokens", "320"]  # fmt: skip
    codes, outs = two_nodes(args, cwds=hosts)
    assert all(code != 0 for code in codes)
    said = "--eval under torchrun reads out on every host, and not every rank sees rank 0's"
    assert said in outs[0][1] and said in outs[1][1], outs[1][1][-3000:]
    assert [p.name for p in tmp_path.rglob("*") if "out" in p.name] == []


def test_a_killed_rank_ends_the_job_quickly_and_the_rerun_resumes(tiny_folder_4, tmp_path,
                                                                  corpora):  # fmt: skip
    calib, _ = corpora
    args = quantize_args(tiny_folder_4, calib, tmp_path / "out")
    start = time.monotonic()
    killed = run([*LAUNCH, "--standalone", "--nproc-per-node", "2", str(DIE), *args],
                 env={"DIE_RANK": "1", "DIE_AFTER": "1"})  # fmt: skip
    assert killed.returncode != 0
    assert time.monotonic() - start < 60
    assert "SIGKILL" in killed.stderr or "another process of the job failed" in killed.stderr
    work = tmp_path / ".out.lowbit-work"
    assert (work / "units" / "00000.json").is_file()  # rank 0 had finished block 0 at least
    assert not (tmp_path / "out").exists()

    resumed = run(
        [*LAUNCH, "--standalone", "--nproc-per-node", "2", "-m", "lowbit", *args[1:]]
    )  # without -q: the progress bar shows where it starts
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert " 0/4 " not in resumed.stderr  # the bar starts at the first unfinished block
    assert "4/4" in resumed.stderr
    assert resumed.stdout.count("saved to") == 1  # rank 0 alone prints
    manifest = json.loads((tmp_path / "out" / "lowbit.json").read_text())
    assert manifest["processes"]["world_size"] == 2
    one_process(quantize_args(tiny_folder_4, calib, tmp_path / "one"))
    assert weights(tmp_path / "out") == weights(tmp_path / "one")
    assert not work.exists() and not list(tmp_path.glob(".out*")), "the work folders are gone"


@pytest.mark.slow  # ~20 s; the group's agreement is tested in tests/calibration/test_group.py
def test_a_rank_0_that_cannot_write_the_folder_fails_every_rank(tiny_folder, tmp_path, corpora):
    """The other ranks do not report success (and drop their work) for a folder that was not
    written; the same command then writes it."""
    calib, _ = corpora
    args = quantize_args(tiny_folder, calib, tmp_path / "out")
    failed = run([*LAUNCH, "--standalone", "--nproc-per-node", "2", str(DIE), *args],
                 env={"FAIL_FINISH": "1"})  # fmt: skip
    assert failed.returncode != 0 and not (tmp_path / "out").exists()
    assert "no space left on device (simulated)" in failed.stderr
    assert "rank 0 could not write the folder" in failed.stderr
    assert (tmp_path / ".out.lowbit-work" / "ranks" / "00001").is_dir()
    again = run([*LAUNCH, "--standalone", "--nproc-per-node", "2", "-m", "lowbit", *args])
    assert again.returncode == 0, again.stderr[-3000:]
    one_process(quantize_args(tiny_folder, calib, tmp_path / "one"))
    assert weights(tmp_path / "out") == weights(tmp_path / "one")


@pytest.fixture
def tiny_folder_4(tmp_path: Path, tokenizer) -> Path:
    """A tiny random Llama with 4 blocks, saved as an HF folder."""
    from helpers import tiny_llama

    folder = tmp_path / "tiny-llama-4"
    tiny_llama(vocab=len(tokenizer), layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow  # ~20 s; CI has eval under torchrun and the killed-rank test (quantize, resume)
def test_analyze_under_torchrun_splits_the_trials_and_gathers_the_same_figures(
    tiny_folder, tmp_path, corpora
):
    calib, _ = corpora
    args = ["analyze", str(tiny_folder), "--recipe", "w4-rtn-g64", "--calib", str(calib),
            "--calib-samples", "4", "--calib-seqlen", "32", "--json"]  # fmt: skip
    single = json.loads(one_process(["-q", *args]).stdout)
    many = run([*LAUNCH, "--standalone", "--nproc-per-node", "2", "-m", "lowbit", "-q", *args])
    assert many.returncode == 0, many.stderr[-3000:]
    assert json.loads(many.stdout) == single
