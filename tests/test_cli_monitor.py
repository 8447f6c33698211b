"""`lowbit monitor`: exit 0 for a folder that reproduces its canary, 1 for a damaged one."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.cli import main


def test_monitor_says_ok_then_degraded_after_damage(tiny_folder, tmp_path, capsys):
    good, bad = tmp_path / "w4", tmp_path / "bad"
    assert main(["-q", "quantize", str(tiny_folder), "--recipe", "w4-rtn-g32", "--out",
                 str(good)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["monitor", str(good)]) == 0
    assert ": ok" in capsys.readouterr().out
    assert main(["monitor", str(good), "--json", "--reference"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "ok" and report["kl"] <= report["tolerance"]
    shutil.copytree(good, bad)
    tensors = load_file(bad / "model.safetensors")
    for name in [k for k in tensors if k.endswith("layers.0.self_attn.o_proj.scale")]:
        tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    assert main(["monitor", str(bad), "--json"]) == 1
    damaged = json.loads(capsys.readouterr().out)
    assert damaged["status"] == "degraded" and damaged["kl"] > damaged["tolerance"]
    assert main(["monitor", str(bad), "--tolerance", "10"]) == 0  # an operator's override


def test_monitor_refuses_what_it_cannot_check(tiny_folder, tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["-q", "quantize", str(tiny_folder), "--recipe", "w4-rtn-g32", "--out", str(out),
                 "--no-canary"]) == 0  # fmt: skip
    assert not (out / "canary.safetensors").exists()
    assert main(["monitor", str(out)]) == 2
    assert "records no canary" in capsys.readouterr().err
    assert main(["monitor", str(tiny_folder)]) == 2
    assert "not a lowbit folder" in capsys.readouterr().err
    assert main(["monitor", str(out), "--tolerance", "-1"]) == 2


def test_an_image_models_folder_is_checked_by_psnr_against_its_float_outputs(
    small_sr, monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", small_sr)
    good, bad, bare = tmp_path / "w8a8", tmp_path / "bad", tmp_path / "bare"
    argv = ["-q", "quantize", "waifu2x-upconv7", "--recipe", "conv-w8a8-static", "--out"]
    assert main([*argv, str(good)]) == 0
    canary = json.loads((good / "lowbit.json").read_text())["canary"]
    assert canary["kind"] == "image" and canary["images"] == 2
    mse = 10 ** (-canary["psnr"] / 10)  # tolerated: 1.5 x its squared error + 1e-8
    assert canary["tolerance_psnr"] == pytest.approx(-10 * math.log10(1.5 * mse + 1e-8))
    capsys.readouterr()
    assert main(["monitor", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "ok" and report["psnr"] == pytest.approx(canary["psnr"], abs=1e-3)
    assert main(["monitor", str(good), "--tolerance", str(canary["psnr"] + 1)]) == 1
    assert "DEGRADED" in capsys.readouterr().out
    shutil.copytree(good, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["body.6.scale"] = tensors["body.6.scale"] * 1.5  # a layer's weights x1.5
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    assert main(["monitor", str(bad), "--json"]) == 1
    damaged = json.loads(capsys.readouterr().out)
    assert damaged["status"] == "degraded" and damaged["psnr"] < damaged["tolerance_psnr"]
    assert main([*argv, str(bare), "--no-canary"]) == 0
    assert not (bare / "canary.safetensors").exists()
