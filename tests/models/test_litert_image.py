"""An image model's LiteRT export read back as a model: its outputs equal the folder's, and
``lowbit eval`` scores and times the file against the folder."""

import json

import pytest
import torch

from helpers import SMALL_IMAGE, make_recipe
from lowbit import api
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.models.load import LoadedModel, load_model

pytest.importorskip("litert_torch", reason="the litert extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")


@pytest.fixture
def exported(small_sr, tmp_path):
    """(folder, .tflite) of the small super-resolution model, int8 per-channel weights."""
    model = small_sr()
    weights = {"bits": 8, "group_size": -1, "symmetric": True}
    report = api.quantize(model, make_recipe(weights, None, ignore=()), progress=False)
    source = LoadedModel(model, None, "waifu2x-upconv7", "image")
    folder = api.save(model, tmp_path / "q", report, source=source)
    return folder, export(folder, "litert", tmp_path / "sr.tflite").path


def test_the_file_runs_as_its_folder(exported):
    folder, path = exported
    loaded = load_model(str(path))
    assert loaded.kind == "litert" and loaded.tokenizer is None
    x = torch.cat([SMALL_IMAGE, SMALL_IMAGE.flip(-1)])  # a batch: one interpreter call per row
    with torch.no_grad():
        want = load_model(str(folder), kernels=False).model(x)
    got = loaded.model(x)
    assert got.shape == want.shape == (2, 3, 48, 56)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(LowbitError, match=r"takes inputs of shape \(3, 24, 28\)"):
        loaded.model(torch.zeros(1, 3, 24, 30))


def test_eval_scores_the_file_against_its_folder(exported, capsys):
    folder, path = exported
    assert main(["eval", str(path), "--ref", str(folder), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["psnr_ref"] > 80 and result["ssim_ref"] > 0.999  # the same codes
    assert result["images"] == 1 and result["images_per_s"] > 0
    assert main(["quantize", str(path), "--recipe", "w8-rtn", "--out", str(path) + ".q"]) == 2
    assert "exported LiteRT file" in capsys.readouterr().err


def test_the_file_upscales_a_larger_image_a_window_at_a_time(exported, tmp_path, capsys):
    """Its one input size (24 x 28) covers a 40 x 50 image in shifted windows: the folder's
    whole-image upscale."""
    import numpy as np
    from PIL import Image

    folder, path = exported
    image = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    outs = {}
    for name, model in (("file", path), ("folder", folder)):
        outs[name] = tmp_path / f"{name}.png"
        argv = ["generate", str(model), "--image", str(image), "--out", str(outs[name])]
        assert main([*argv, "--tile", "0"] if name == "folder" else argv) == 0
    with Image.open(outs["file"]) as a, Image.open(outs["folder"]) as b:
        got, want = np.asarray(a).astype(int), np.asarray(b).astype(int)
    assert got.shape == (80, 100, 3) and np.abs(got - want).max() <= 1  # 8-bit rounding
    small = tmp_path / "small.png"
    Image.fromarray(pixels[:20]).save(small)
    argv = ["generate", str(path), "--image", str(small), "--out", str(tmp_path / "s.png")]
    assert main(argv) == 2
    assert "small.png: the model takes 28x24 inputs; the image is 50x20" in capsys.readouterr().err
