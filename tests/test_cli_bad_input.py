"""Bad input, one class per row: each is one line on stderr naming what is wrong, exit 2, found
before any work, and nothing left behind. Tiny models; seconds in all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lowbit.cli import main

RTN = ["--recipe", "w4-rtn-g32"]


@pytest.fixture
def quantized(tiny_folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), *RTN, "--out", str(out), "-q"]) == 0
    return out


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def first_layer(manifest: dict) -> dict:
    return next(iter(manifest["layers"].values()))


def bad_recipe(tmp: Path, name: str, **weights) -> str:
    path = tmp / name
    path.write_text(json.dumps({"version": 1, "weights": {"bits": 4, **weights}}))
    return str(path)


def run(capsys, args: list[str]) -> str:
    """Exit 2 with one line on stderr; returns it."""
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refuses bad values itself, also with exit 2
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 or err.startswith("usage:"), err
    return err.splitlines()[-1]


def test_quantize_input_errors(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "out")
    q = ["quantize", str(tiny_folder), *RTN, "--out", out, "-q"]
    group48 = bad_recipe(tmp_path, "g48.yaml", group_size=48)
    (tmp_path / "a-file").write_text("")
    cases = {  # what is wrong: (arguments, what the line says)
        "path too long": (["quantize", "x" * 300, *RTN, "--out", out], "File name too long"),
        "group size fits no layer": (["quantize", str(tiny_folder), "--recipe", group48,
                                      "--out", out, "-q"], "group_size 48 does not divide"),
        "--out below a file": (["quantize", str(tiny_folder), *RTN, "--out",
                                str(tmp_path / "a-file" / "o")], "not a writable"),
        "--threads -1": (["--threads", "-1", *q], "threads are in [1, 1024]"),
        "--threads 0": (["--threads", "0", *q], "threads are in [1, 1024]"),
        "--calib-samples 0": ([*q[:-1], "--calib-samples", "0"], "positive integer"),
        "--eval-tokens below a window": ([*q, "--eval", "--eval-tokens", "100",
                                          "--eval-seqlen", "512"],
                                         "--eval-tokens 100 is shorter than one window"),
        "--kv-bits 9": ([*q, "--kv-bits", "9"], "expected 2 to 8 bits"),
        "cache flags on an image model": (["quantize", "dcgan-faces", "--recipe",
                                           "conv-w8a8-static", "--out", out, "--kv-bits", "4"],
                                          "dcgan-faces is an image model"),
        "--seed past 2**63": ([*q, "--seed", str(2**64)], "a seed is in [0, 2**63)"),
        "--target-bits nan": ([*q, "--target-bits", "nan"], "expected a positive number"),
        "--out inside the model": (["quantize", str(tiny_folder), *RTN, "--out",
                                    str(tiny_folder / "q")], "lies inside the input"),
        "unknown --eval-corpus": ([*q, "--eval", "--eval-corpus", "nosuch",
                                   "--eval-seqlen", "32", "--eval-tokens", "64"],
                                  "--eval-corpus: unknown corpus 'nosuch'"),
        "a cache group the heads refuse": ([*q, "--kv-bits", "4", "--kv-group", "7"],
                                           "does not divide the head dimension"),
        "static ranges for the head": (["quantize", str(tiny_folder), "--recipe",
                                        "conv-w8a8-static", "--out", out, "-q",
                                        "--calib-samples", "2", "--calib-seqlen", "32"],
                                       "outside the decoder blocks (lm_head)"),
    }  # fmt: skip
    negative = bad_recipe(tmp_path, "r.yaml", group_size=-2)
    says = "r.yaml: weights: group_size must be"
    cases["recipe key error"] = (["quantize", str(tiny_folder), "--recipe", negative,
                                  "--out", out, "-q"], says)  # fmt: skip
    binary = tmp_path / "r.bin"
    binary.write_bytes(bytes(range(256)))
    cases["binary recipe"] = (["quantize", str(tiny_folder), "--recipe", str(binary),
                               "--out", out], "r.bin: not a text file")  # fmt: skip
    for name, (args, says) in cases.items():
        line = run(capsys, args)
        assert says in line, (name, line)
        assert not Path(out).exists(), name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_truncated_gguf_is_one_line(tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF" + bytes(996))
    line = run(capsys, ["quantize", str(cut), *RTN, "--out", str(tmp_path / "o")])
    assert "could not read GGUF file" in line and "cut.gguf" in line


def test_overwrite_refuses_a_folder_lowbit_did_not_write(tiny_folder, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = run(capsys, ["quantize", str(tiny_folder), *RTN, "--out", str(mine), "--overwrite"])
    assert "not a folder lowbit wrote (it holds notes.txt)" in line
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
from lowbit.assets import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(bytes(1 << 20))
    os.kill(os.getpid(), signal.SIGKILL)  # mid-save, as an OOM kill would
"""


def test_kill_9_during_a_save_then_the_same_command_leaves_no_temporary(tiny_folder, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "q")], env=env)
    assert done.returncode == -9
    assert [p.name for p in tmp_path.glob(".q.*.tmp")]  # what the kill left
    assert main(["quantize", str(tiny_folder), *RTN, "--out", str(tmp_path / "q"), "-q"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q")]


def test_overwrite_never_replaces_a_file_with_a_folder(tiny_folder, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    line = run(capsys, ["quantize", str(tiny_folder), *RTN, "--out", str(notes), "--overwrite"])
    assert "notes.txt is a file; --overwrite replaces only what lowbit writes" in line
    assert notes.read_text() == "keep me"


def test_a_checkpoint_with_an_integer_weight_is_one_line(tiny_folder, tmp_path, capsys):
    """transformers casts it silently; the streamed quantization crashed in its first block."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ints"
    shutil.copytree(tiny_folder, folder)
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name].to(torch.int32)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    line = run(capsys, ["quantize", str(folder), *RTN, "--out", str(tmp_path / "q")])
    assert f"tensor '{name}' is stored as I32; the model holds it as a float" in line
    assert not (tmp_path / "q").exists()


def halve(q: Path) -> None:
    path = q / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def manifest(change):
    return lambda q: edit_json(q / "lowbit.json", change)


def layer(change):
    return manifest(lambda m: change(first_layer(m)))


DAMAGES = {  # name: (damage, what the line says)
    "truncated shard": (halve, "model.safetensors is truncated"),
    "layer lost": (
        manifest(lambda m: m["layers"].pop(next(iter(m["layers"])))),
        "holds packed codes for model.layers.0.self_attn.q_proj, which lowbit.json does not",
    ),
    "bits 99": (layer(lambda x: x["weights"].update(bits=99)), "formats have 1 to 8 bits, got 99"),
    "shape": (layer(lambda x: x.update(out_features=7)), "lowbit.json implies"),
    "zero size": (layer(lambda x: x.update(in_features=0)), "in_features: expected a positive"),
    "no weights": (layer(lambda x: x.pop("weights")), "weights: expected a mapping"),
    "layers not a mapping": (manifest(lambda m: m.update(layers=[1, 2])), "must be a mapping"),
    "manifest a list": (lambda q: (q / "lowbit.json").write_text("[]"), "not a lowbit manifest"),
    "unknown model_type": (
        lambda q: edit_json(q / "config.json", lambda c: c.update(model_type="nonesuch")),
        "model_type 'nonesuch' is not an architecture transformers",
    ),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_lowbit_folder_is_refused_by_inspect_and_loaders(quantized, capsys, name):
    damage, says = DAMAGES[name]
    damage(quantized)
    commands = [["inspect", str(quantized)],
                ["eval", str(quantized), "--tokens", "64", "--seqlen", "32", "-q"]]  # fmt: skip
    if name == "unknown model_type":
        commands = commands[1:]  # inspect reads no config
    for args in commands:
        assert says in run(capsys, args), args


def test_inspect_verify_recomputes_the_hashes(quantized, capsys):
    assert main(["inspect", str(quantized), "--verify"]) == 0
    assert "weight files match their sha256" in capsys.readouterr().out
    data = bytearray((quantized / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor: the header still agrees
    (quantized / "model.safetensors").write_bytes(bytes(data))
    assert main(["inspect", str(quantized)]) == 0  # the structure is intact
    line = run(capsys, ["inspect", str(quantized), "--verify"])
    assert "model.safetensors does not match the sha256 lowbit.json recorded" in line


def test_inspect_verify_refuses_a_weight_file_the_manifest_does_not_record(quantized, capsys):
    """A shard index naming one more file (here zeroing a norm): a load reads it, so a check
    of the recorded files alone passed a destroyed model."""
    import torch
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.zeros(64)}, str(quantized / "zz-extra.safetensors"))
    names = json.loads((quantized / "lowbit.json").read_text())["files"]
    weight_map = {"model.norm.weight": "zz-extra.safetensors",
                  **{f"x{i}": n for i, n in enumerate(names)}}  # fmt: skip
    (quantized / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    line = run(capsys, ["inspect", str(quantized), "--verify"])
    assert "zz-extra.safetensors is loaded (the shard index lists it) but lowbit.json" in line


def test_a_short_calibration_file_leaves_nothing_in_the_cache(tiny_folder, tmp_path, capsys):
    import os

    words = tmp_path / "three.txt"
    words.write_text("three short words")
    args = ["quantize", str(tiny_folder), "--recipe", "w3-gptq-g32", "--out",
            str(tmp_path / "o"), "--calib", str(words), "--calib-seqlen", "64", "-q"]  # fmt: skip
    assert "the corpus has 3 tokens" in run(capsys, args)
    tokens = Path(os.environ["LOWBIT_CACHE"]) / "tokens"
    assert not tokens.exists() or not list(tokens.iterdir())


def test_a_tokenizer_that_cannot_be_read_is_an_error_not_a_missing_one(tiny_folder, tmp_path,
                                                                         capsys):  # fmt: skip
    """A corrupt tokenizer.json was taken for none: quantize warned, wrote a folder without a
    tokenizer and exited 0."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / "tokenizer.json").write_text('{"truncated": ')
    out = tmp_path / "o"
    says = run(capsys, ["quantize", str(broken), *RTN, "--out", str(out)])
    assert "cannot read the tokenizer in" in says and "tokenizer.json" in says
    assert not out.exists()


def test_copying_a_folder_keeps_it_loadable(quantized, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(quantized, copy)
    assert main(["inspect", str(copy), "--verify", "-q"]) == 0


def test_other_commands_refuse_what_they_cannot_use(quantized, tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = {
        "export over its own input": (["export", str(quantized), "--format",
                                       "compressed-tensors", "--out", str(quantized),
                                       "--overwrite"], "is, holds or lies inside the input"),
        "LiteRT options for ONNX": (["export", str(quantized), "--format", "onnx", "--out", out,
                                     "--kv-cache"], "--kv-cache is for litert export"),
        "--system without --chat": (["generate", str(quantized), "--prompt", "a", "--system",
                                     "be brief"], "--system goes with --chat"),
        "--seed past 2**63": (["generate", str(quantized), "--prompt", "a", "--seed",
                               str(2**64)], "a seed is in [0, 2**63)"),
        "a port past 65535": (["serve", str(quantized), "--port", "99999"], "a port is in"),
        "an empty --api-key": (["serve", str(quantized), "--api-key", ""], "--api-key is empty"),
        "analyze over a file": (["analyze", str(tiny_folder), *RTN, "--out",
                                 str(quantized / "lowbit.json")], "already exists"),
        "a plot over a file": (["analyze", str(tiny_folder), *RTN, "--plot",
                                str(quantized / "lowbit.json")], "choose another --plot"),
        "diff --top -3": (["diff", str(tiny_folder), str(quantized), "--top", "-3"],
                          "positive integer"),
        "windows past the context": (["eval", str(quantized), "--seqlen", "1000", "--tokens",
                                      "2000", "-q"], "q's context of 256 positions"),
        "diff windows past the context": (["diff", str(tiny_folder), str(quantized), "--seqlen",
                                           "1000", "--tokens", "2000"],
                                          "--seqlen 1000 exceeds the model's context of 256"),
        "--eval windows past the context (found before quantizing)": (
            ["quantize", str(tiny_folder), *RTN, "--out", out, "--eval", "--eval-seqlen", "1000",
             "--eval-tokens", "2000"], "--eval-seqlen 1000 exceeds the model's context"),
        "a NaN canary tolerance": (["serve", str(quantized), "--canary-tolerance", "nan"],
                                   "--canary-tolerance is a number >= 0"),
        "a negative --alert-kl": (["serve", str(quantized), "--ref", str(tiny_folder),
                                   "--alert-kl", "-1"], "--alert-kl is a number >= 0"),
        "--shadow-rate without --ref": (["serve", str(quantized), "--shadow-rate", "0.5"],
                                        "--shadow-rate needs --ref"),
        "an infinite learning rate": (["qat", str(tiny_folder), *RTN, "--train", "wiki", "--lr",
                                       "inf", "--out", out], "lr in (0, 1]"),
        "--candidates without a target": (["quantize", str(tiny_folder), *RTN, "--out", out,
                                          "--candidates", "4", "8"], "--candidates choose"),
        "--threads past any machine": (["--threads", "100000", "inspect", str(quantized)],
                                       "threads are in [1, 1024]"),
    }  # fmt: skip
    for name, (args, says) in cases.items():
        assert says in run(capsys, args), name
    assert (quantized / "lowbit.json").is_file() and not Path(out).exists()


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(quantized, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        number = busy.getsockname()[1]
        says = run(capsys, ["serve", str(quantized), "--port", str(number)])
    assert f"cannot listen on 127.0.0.1:{number} (Address already in use)" in says
    says = run(capsys, ["serve", str(quantized), "--host", "203.0.113.9", "--port", "8000"])
    assert "cannot listen on 203.0.113.9:8000" in says  # (a documentation address: not ours)


def test_chat_needs_a_chat_template(quantized, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert "has no chat template" in run(capsys, ["chat", str(quantized)])
