"""`lowbit quantize` / `lowbit eval` on an image model (the DCGAN generator with random weights
here: the real checkpoint is scored in benchmarks/image_table.py and the slow tests)."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.models.images.dcgan import DCGANGenerator


@pytest.fixture
def random_gan(monkeypatch):
    def build() -> DCGANGenerator:
        torch.manual_seed(3)
        return DCGANGenerator().eval()

    monkeypatch.setattr("lowbit.models.images.dcgan_faces", build)


def test_quantize_eval_and_reload_an_image_model(random_gan, tmp_path, capsys):
    out = tmp_path / "gan-w8a8"
    assert main(["quantize", "dcgan-faces", "--recipe", "conv-w8a8-static", "--out", str(out),
                 "--eval", "--json", "-q"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layers"] == 5 and 8 <= summary["bits_per_weight"] < 8.1
    assert summary["eval"]["psnr_ref"] > 30 and summary["eval"]["images"] == 256
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["source"] == {"model": "dcgan-faces", "kind": "image"}
    assert manifest["calibration"]["shape"] == [100, 1, 1]
    assert main(["eval", str(out), "--ref", "dcgan-faces", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["psnr_ref"] == pytest.approx(summary["eval"]["psnr_ref"], rel=1e-6)


def test_image_models_refuse_what_does_not_apply(random_gan, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["quantize", "dcgan-faces", "--recipe", "w8a8-dynamic", "--out", out]) == 2
    assert "rounded per tensor" in capsys.readouterr().err
    assert main(["quantize", "dcgan-faces", "--recipe", "w8-rtn", "--out", out,
                 "--dry-run"]) == 2  # fmt: skip
    assert "--dry-run is for language models" in capsys.readouterr().err
    assert main(["quantize", "dcgan-faces", "--recipe", "w4-gptq-g64", "--out", out]) == 2
    assert "data-free weights" in capsys.readouterr().err
    for argv in (["bench", "dcgan-faces"], ["analyze", "dcgan-faces", "--recipe", "w8-rtn"],
                 ["qat", "dcgan-faces", "--recipe", "w8-rtn", "--out", out]):  # fmt: skip
        assert main(argv) == 2
        assert "works on language models" in capsys.readouterr().err
