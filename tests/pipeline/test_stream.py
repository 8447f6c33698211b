"""Streaming quantization on tiny models: same bytes as in memory, resume after a crash at any
block, the dry-run estimate, and bad checkpoints caught before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import FAMILIES, make_recipe, tiny_family_model
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.errors import LowbitError
from lowbit.models import tensorfile
from lowbit.models.workdir import work_path
from lowbit.pipeline import stream as stream_module

RTN = make_recipe({"bits": 4, "group_size": 32})


def gptq():
    from lowbit.recipes import Recipe

    weights = {"bits": 3, "group_size": 32}
    body = {"version": 1, "name": "g", "algorithm": "gptq", "weights": weights}
    return Recipe.from_dict({**body, "ignore": ["lm_head"]})


def calib(vocab: int = 50) -> CalibrationSet:
    windows = torch.randint(0, vocab, (6, 24), generator=torch.Generator().manual_seed(1))
    return CalibrationSet("test", 6, 24, 0, windows)


def sharded(folder: Path, out: Path) -> Path:
    """``folder`` re-saved as 3 shards with an index (as transformers writes big models)."""
    from lowbit.models.checkpoint import write_shards
    from lowbit.models.source import TensorSource

    shutil.copytree(folder, out)
    (out / "model.safetensors").unlink()
    src = TensorSource(folder)
    items = sorted(src.entries.items())
    units = [dict(items[i::3]) for i in range(3)]
    write_shards(out, units, max_bytes=1)
    return out


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model*.safetensors*"))}


@pytest.mark.parametrize("recipe", [RTN, gptq()], ids=["rtn", "gptq"])
def test_streamed_output_equals_in_memory_byte_for_byte(tiny_folder, tmp_path, recipe):
    data = calib() if recipe.algorithm == "gptq" else None
    src = api.load_model(str(tiny_folder))
    report = api.quantize(src.model, recipe, data, progress=False)
    mem = api.save(src.model, tmp_path / "mem", report, source=src)
    out, streamed = api.quantize_to(str(tiny_folder), recipe, tmp_path / "stream", data,
                                    progress=False)  # fmt: skip
    assert files(mem) == files(out) and files(out)
    assert streamed.layers.keys() == report.layers.keys()
    assert not work_path(out).exists()
    x = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        a = api.load(mem, kernels=False).model(x).logits
        b = api.load(out, kernels=False).model(x).logits
    assert torch.equal(a, b)


def test_sharded_source_and_output(tiny_folder, tmp_path, monkeypatch):
    source = sharded(tiny_folder, tmp_path / "sharded")
    assert (source / "model.safetensors.index.json").is_file()
    plain, _ = api.quantize_to(str(tiny_folder), RTN, tmp_path / "a", progress=False)
    monkeypatch.setattr("lowbit.models.checkpoint.MAX_SHARD_BYTES", 20_000)
    out, _ = api.quantize_to(str(source), RTN, tmp_path / "b", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    x = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        a = api.load(plain, kernels=False).model(x).logits
        b = api.load(out, kernels=False).model(x).logits
    assert torch.equal(a, b)


class Crash(Exception):
    pass


@pytest.mark.parametrize("at", [0, 1, 2])  # block 0, block 1, the rest (embeddings, head)
@pytest.mark.parametrize(
    "spill", [(False, False), (True, True), (True, False)], ids=["memory", "disk", "disk-memory"]
)  # how the killed run, then the resumed one, held the hidden states
def test_killed_run_resumes_to_the_same_bytes(tiny_folder, tmp_path, monkeypatch, at, spill):
    data = calib()
    whole, _ = api.quantize_to(str(tiny_folder), gptq(), tmp_path / "whole", data, progress=False)
    original = stream_module.WorkFolder.write_unit

    def crashing(self, index, *args, **kwargs):
        if index == at:
            raise Crash
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(stream_module.WorkFolder, "write_unit", crashing)
    with pytest.raises(Crash):
        api.quantize_to(str(tiny_folder), gptq(), tmp_path / "again", data, progress=False,
                        spill=spill[0])  # fmt: skip
    assert not (tmp_path / "again").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".again.lowbit-work",
        "tiny-llama",
        "whole",
    ]
    monkeypatch.setattr(stream_module.WorkFolder, "write_unit", original)
    out, report = api.quantize_to(str(tiny_folder), gptq(), tmp_path / "again", data,
                                  progress=False, spill=spill[1])  # fmt: skip
    assert files(out) == files(whole)
    assert len(report.blocks) == 2 and len(report.layers) == 14
    # the resumed walk read the finished blocks again for the canary: the same file
    canary = (out / "canary.safetensors").read_bytes()
    assert canary == (whole / "canary.safetensors").read_bytes()
    assert not work_path(out).exists()


def test_resume_with_another_recipe_is_an_error(tiny_folder, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(stream_module.WorkFolder, "write_unit", crash)
    with pytest.raises(Crash):
        api.quantize_to(str(tiny_folder), RTN, tmp_path / "q", progress=False)
    monkeypatch.undo()
    other = make_recipe({"bits": 3, "group_size": 32})
    with pytest.raises(LowbitError, match="another recipe.*--restart"):
        api.quantize_to(str(tiny_folder), other, tmp_path / "q", progress=False)
    api.quantize_to(str(tiny_folder), other, tmp_path / "q", progress=False, restart=True)


def test_dry_run_estimate(tiny_folder):
    plan = api.estimate(str(tiny_folder), gptq(), calib(), progress=False)
    for key in ("peak_rss_mb", "seconds", "output_bytes", "bits_per_weight"):
        assert plan[key] > 0
    assert plan["blocks"] == 2 and len(plan["layers"]) == 14
    assert plan["bits_per_weight"] == pytest.approx(4.0)  # int3 + fp16 scale and offset per 32


def test_missing_shard_is_named(tiny_folder, tmp_path):
    source = sharded(tiny_folder, tmp_path / "sharded")
    (source / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(LowbitError, match="model-00002-of-00003.safetensors, which is missing"):
        api.quantize_to(str(source), RTN, tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded", "tiny-llama"]


def test_truncated_shard_is_named(tiny_folder, tmp_path):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(LowbitError, match="model.safetensors is truncated"):
        api.quantize_to(str(tiny_folder), RTN, tmp_path / "q", progress=False)


def test_shape_that_disagrees_with_config_is_named(tiny_folder, tmp_path):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (tiny_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="mlp.*has shape .* config.json implies"):
        api.quantize_to(str(tiny_folder), RTN, tmp_path / "q", progress=False)


def test_full_disk_is_one_error_and_leaves_nothing_outside_the_work_folder(
    tiny_folder, tmp_path, monkeypatch
):
    real = tensorfile._write_item
    calls = []

    def full(f, item):
        calls.append(1)
        if len(calls) > 12:
            raise OSError(28, "No space left on device")
        real(f, item)

    monkeypatch.setattr(tensorfile, "_write_item", full)
    with pytest.raises(LowbitError, match="No space left on device"):
        api.quantize_to(str(tiny_folder), RTN, tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.lowbit-work", "tiny-llama"]
    units = list((tmp_path / ".q.lowbit-work" / "units").iterdir())
    assert all(not p.name.startswith(".") for p in units)  # no temporary left behind


def test_spilled_hidden_states_give_the_same_bytes(tiny_folder, tmp_path, monkeypatch):
    from lowbit.calibration import hidden as hidden_module

    data = calib()
    a, ra = api.quantize_to(str(tiny_folder), gptq(), tmp_path / "a", data, progress=False)
    reads = []
    load = hidden_module.load_file
    monkeypatch.setattr(hidden_module, "load_file", lambda p: reads.append(p) or load(p))
    b, rb = api.quantize_to(str(tiny_folder), gptq(), tmp_path / "b", data, progress=False,
                            spill=True)  # fmt: skip
    assert files(a) == files(b)
    assert [x.output_error for x in ra.blocks] == [x.output_error for x in rb.blocks]
    assert reads and all(".lowbit-work" in str(p) for p in reads)  # read from the work folder
    assert not work_path(b).exists()
    plan = api.estimate(str(tiny_folder), gptq(), data, progress=False, spill=True)
    assert plan["hidden"] == {"dtype": "float32", "spilled": True}


def test_bfloat16_hidden_states_change_little(tiny_folder, tmp_path):
    data = calib()
    a, ra = api.quantize_to(str(tiny_folder), gptq(), tmp_path / "a", data, progress=False)
    b, rb = api.quantize_to(str(tiny_folder), gptq(), tmp_path / "b", data, progress=False,
                            hidden_dtype="bfloat16")  # fmt: skip
    assert files(a) != files(b)  # the second block was calibrated on rounded inputs
    for x, y in zip(ra.blocks, rb.blocks, strict=True):
        assert y.output_error == pytest.approx(x.output_error, rel=0.2)
    with pytest.raises(LowbitError, match="float32 or bfloat16"):
        api.quantize_to(str(tiny_folder), gptq(), tmp_path / "c", data, hidden_dtype="half")


def test_cli_dry_run_json_and_max_memory(tiny_folder, tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "q"
    args = ["quantize", str(tiny_folder), "--recipe", "w4-rtn-g32", "--out", str(out)]
    assert main([*args, "--dry-run", "--json", "-q"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"peak_rss_mb", "seconds", "output_bytes", "bits_per_weight"} <= plan.keys()
    assert not out.exists()
    assert main([*args, "-q", "--max-memory", "1MB"]) == 2
    assert "needs about" in capsys.readouterr().err and not out.exists()
    assert main([*args, "-q", "--max-memory", "lots"]) == 2
    assert "--max-memory: expected a size" in capsys.readouterr().err
    assert main([*args, "-q", "--max-memory", "20GB"]) == 0 and out.is_dir()


KILLER = """
import os, signal, sys, torch
from lowbit import api
from lowbit.calibration import CalibrationSet
from lowbit.models import tensorfile
from lowbit.recipes import Recipe

real, calls = tensorfile._write_item, [0]
def write(f, item):
    calls[0] += 1
    if calls[0] == int(sys.argv[3]):
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # mid-file, as a crash or an OOM kill would
    real(f, item)
tensorfile._write_item = write
windows = torch.randint(0, 50, (6, 24), generator=torch.Generator().manual_seed(1))
recipe = Recipe.from_dict({"version": 1, "name": "g", "algorithm": "gptq",
                           "weights": {"bits": 3, "group_size": 32}, "ignore": ["lm_head"]})
api.quantize_to(sys.argv[1], recipe, sys.argv[2], CalibrationSet("t", 6, 24, 0, windows),
                progress=False)
print(calls[0])
"""


@pytest.mark.slow  # a minute of child processes; CI keeps the in-process kill/resume tests above
def test_kill_9_at_three_points_then_resume_gives_the_same_bytes(tiny_folder, tmp_path):
    import subprocess
    import sys

    def run(out, kill_at):
        cmd = [sys.executable, "-c", KILLER, str(tiny_folder), str(out), str(kill_at)]
        return subprocess.run(cmd, capture_output=True, text=True)

    whole = run(tmp_path / "whole", 0)
    assert whole.returncode == 0, whole.stderr
    total = int(whole.stdout.split()[-1])
    out = tmp_path / "again"
    for kill_at in (3, total // 2, total - 1):  # block 0, mid-run, assembling the shards
        killed = run(out, kill_at)
        assert killed.returncode == -9, killed.stderr
        assert not out.exists()
        assert run(out, 0).returncode == 0
        assert files(out) == files(tmp_path / "whole")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "tiny-llama", "whole"]
        shutil.rmtree(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_streams_to_the_in_memory_bytes(family, tmp_path):
    tiny_family_model(family).save_pretrained(tmp_path / "src")
    src = api.load_model(str(tmp_path / "src"))
    report = api.quantize(src.model, RTN, progress=False)
    mem = api.save(src.model, tmp_path / "mem", report, source=src)
    out, streamed = api.quantize_to(str(tmp_path / "src"), RTN, tmp_path / "q", progress=False)
    assert files(out) == files(mem) and len(streamed.layers) == len(report.layers) > 0
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert torch.equal(api.load(out, kernels=False).model(x).logits,
                           api.load(mem, kernels=False).model(x).logits)  # fmt: skip
    assert_canary_is_the_float_models(out, tmp_path / "src")


def assert_canary_is_the_float_models(out: Path, source: Path) -> None:
    """The canary the streamed walk recorded is what the whole float model answers, and the
    KL it recorded for the quantized path is what the saved folder scores."""
    from lowbit.eval.canary import Canary, check, model_logits

    canary = Canary.load(out / "canary.safetensors")
    direct = Canary.from_logits(canary.tokens, model_logits(api.load_model(str(source)).model,
                                                            canary.tokens))  # fmt: skip
    assert torch.equal(direct.top_ids, canary.top_ids)
    torch.testing.assert_close(direct.top_logp, canary.top_logp, rtol=1e-5, atol=1e-5)
    saved = api.load(out, kernels=False)
    again = check(saved.model, out, saved.manifest)
    assert again.kl == pytest.approx(saved.manifest["canary"]["kl"], rel=1e-3, abs=1e-7)
    assert again.ok


@pytest.mark.parametrize("tie", [True, False])
def test_quantized_output_head_streams_tied_or_not(tie, tmp_path):
    from helpers import tiny_llama

    tiny_llama(tie=tie).save_pretrained(tmp_path / "src")
    recipe = make_recipe({"bits": 4, "group_size": 32}, ignore=())
    src = api.load_model(str(tmp_path / "src"))
    report = api.quantize(src.model, recipe, progress=False)
    mem = api.save(src.model, tmp_path / "mem", report, source=src)
    out, streamed = api.quantize_to(str(tmp_path / "src"), recipe, tmp_path / "q", progress=False)
    assert "lm_head" in streamed.layers and files(out) == files(mem)
    assert_canary_is_the_float_models(out, tmp_path / "src")  # a float head, tied or not


def test_gpt2s_float_conv1d_layers_save_in_their_own_layout(tmp_path):
    """GPT-2's Conv1D weights are (in, out) on disk: those left in float (here both c_proj,
    one of them square, which a wrong layout would load silently transposed) are written back
    so, in memory and streamed, and the folders reload to the same logits."""
    src_folder = tmp_path / "gpt2"
    tiny_family_model("gpt2").save_pretrained(src_folder)
    floats = ("lm_head", "re:.*attn\\.c_proj$", "re:.*mlp\\.c_proj$")
    recipe = make_recipe({"bits": 4, "group_size": 32}, ignore=floats)
    src = api.load_model(str(src_folder))
    report = api.quantize(src.model, recipe, progress=False)
    mem = api.save(src.model, tmp_path / "mem", report, source=src)
    out, _ = api.quantize_to(str(src_folder), recipe, tmp_path / "stream", progress=False)
    assert files(mem) == files(out)
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        want = src.model(x).logits
        for folder in (mem, out):
            assert torch.equal(api.load(folder, kernels=False).model(x).logits, want)
