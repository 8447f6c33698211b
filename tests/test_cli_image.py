"""`lowbit quantize` / `lowbit eval` on an image model (the DCGAN generator with random weights
here: the real checkpoint is scored in benchmarks/image_table.py and the slow tests)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit.cli import main
from lowbit.models.images.dcgan import DCGANGenerator


@pytest.fixture
def random_gan(monkeypatch):
    def build() -> DCGANGenerator:
        torch.manual_seed(3)
        return DCGANGenerator(ngf=16).eval()  # a quarter of the width: the same five layers

    monkeypatch.setattr("lowbit.models.images.dcgan_faces", build)
    monkeypatch.setattr("lowbit.models.images.DCGANGenerator", build)  # the reload's skeleton


class _Features(torch.nn.Module):
    """Stands in for the 81 MB Inception extractor (the slow tests use the real one)."""

    def forward(self, x):
        return x[:, :, ::30, ::30].flatten(1)


def test_quantize_eval_and_reload_an_image_model(random_gan, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lowbit.models.images.inception.inception_extractor", _Features)
    out = tmp_path / "gan-w8a8"
    assert main(["quantize", "dcgan-faces", "--recipe", "conv-w8a8-static", "--out", str(out),
                 "--eval", "--json", "-q"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layers"] == 5 and 8 <= summary["bits_per_weight"] < 8.1
    assert summary["eval"]["psnr_ref"] > 30 and summary["eval"]["images"] == 256
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["source"] == {"model": "dcgan-faces", "kind": "image"}
    assert manifest["calibration"]["shape"] == [100, 1, 1]
    grid = tmp_path / "grid.png"
    assert main(["eval", str(out), "--ref", "dcgan-faces", "--json", "--grid", str(grid),
                 "--fd"]) == 0  # fmt: skip
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["fd_inception_ref"] > 0
    assert again["psnr_ref"] == pytest.approx(summary["eval"]["psnr_ref"], rel=1e-6)
    assert again["grid"] == str(grid) and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(grid) as image:  # 4 rows of 3 images: taller than wide
        assert image.size[1] > image.size[0]
    assert main(["diff", "dcgan-faces", str(out), "--json", "-q"]) == 0
    diff = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert diff["images"] == 256 and len(diff["layers"]) == 5 and diff["mse"] > 0
    assert diff["psnr"] == pytest.approx(summary["eval"]["psnr_ref"], abs=3)  # batch vs mean
    assert main(["eval", str(out), "--grid", str(grid)]) == 2
    assert "give --ref" in capsys.readouterr().err
    assert main(["eval", "waifu2x-upconv7", "--ref", "waifu2x-upconv7", "--fd"]) == 2
    assert "scored on one image" in capsys.readouterr().err
    refused = {  # options and inputs that would do nothing, or something else than asked
        ("quantize", str(out), "--recipe", "conv-w8a8-static", "--out", str(tmp_path / "q")):
            "already quantized; quantize the float model (dcgan-faces)",
        ("quantize", "dcgan-faces", "--recipe", "conv-w8a8-static", "--out",
         str(tmp_path / "q"), "--calib-samples", "16"): "--calib-samples is for language models",
        ("quantize", "dcgan-faces", "--recipe", "conv-w8a8-steps", "--out", str(tmp_path / "q")):
            "keeps one range per slice of a diffusion sampler's timesteps",
        ("eval", str(out), "--ref", "waifu2x-upconv7"):
            "--ref waifu2x-upconv7 is a waifu2x-upconv7 model; it must be dcgan-faces",
        ("eval", str(out), "--ref", str(tmp_path)): "is not an image model",
        ("eval", str(out), "--corpus", "bbc"): "--corpus is for language models",
        ("eval", "some-text-model", "--ref", str(out)): "is an image model; some-text-model is",
        ("diff", str(out), str(out)): "quantized; diff against the float model (dcgan-faces)",
        ("diff", "dcgan-faces", str(out), "--seqlen", "64"): "--seqlen is for language models",
        ("diff", "dcgan-faces", "waifu2x-upconv7"): "Q waifu2x-upconv7 is a waifu2x-upconv7",
        ("generate", str(out), "--out", str(tmp_path / "s.png"), "--temperature", "0.7"):
            "--temperature is for language models",
        ("generate", "waifu2x-upconv7", "--image", "x.png", "--seed", "3", "--out",
         str(tmp_path / "u.png")): "--seed is for generators",
    }  # fmt: skip
    for argv, said in refused.items():
        assert main(list(argv)) == 2, argv
        assert said in capsys.readouterr().err, argv
    assert not (tmp_path / "q").exists() and not (tmp_path / "s.png").exists()


def test_image_models_refuse_what_does_not_apply(random_gan, tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["quantize", "dcgan-faces", "--recipe", "w8a8-dynamic", "--out", out]) == 2
    assert "rounded per tensor" in capsys.readouterr().err
    assert main(["quantize", "dcgan-faces", "--recipe", "w8-rtn", "--out", out,
                 "--dry-run"]) == 2  # fmt: skip
    assert "--dry-run is for language models" in capsys.readouterr().err
    assert main(["quantize", "dcgan-faces", "--recipe", "w4-autoround-g64", "--out", out]) == 2
    assert "AutoRound and LKD run block by block" in capsys.readouterr().err
    for argv in (["bench", "dcgan-faces"], ["qat", "dcgan-faces", "--recipe", "w8-rtn", "--out",
                                            out]):  # fmt: skip
        assert main(argv) == 2
        assert "works on language models" in capsys.readouterr().err


def test_mixed_precision_picks_each_convolutions_format_by_output_error(random_gan, tmp_path,
                                                                        capsys):  # fmt: skip
    out = tmp_path / "mixed"
    assert main(["quantize", "dcgan-faces", "--recipe", "w4-rtn-channel", "--target-bits", "6",
                 "--candidates", "4", "8", "--analysis-samples", "8", "--out", str(out),
                 "--json", "-q"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mixed = summary["mixed_precision"]
    assert 4 < summary["bits_per_weight"] <= 6 and mixed["analysis_tokens"] == 8
    assert mixed["layers_per_candidate"]["int4"] >= 1 and mixed["layers_per_candidate"]["int8"] >= 1
    assert mixed["predicted_mse"] > 0
    manifest = json.loads((out / "lowbit.json").read_text())
    bits = {n: v["weights"]["bits"] for n, v in manifest["layers"].items()}
    assert len(bits) == 5 and set(bits.values()) == {4, 8}
    assert manifest["mixed_precision"]["predicted_mse"] == pytest.approx(mixed["predicted_mse"])


def test_a_super_resolution_model_calibrates_on_the_users_images(monkeypatch, tmp_path, capsys):
    from PIL import Image

    from lowbit.models.images.waifu2x import UpConv7

    def build() -> UpConv7:
        torch.manual_seed(0)
        return UpConv7().eval()

    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", build)
    rng = np.random.default_rng(0)
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (140, 160, 3), dtype=np.uint8)).save(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "sr"
    argv = ["quantize", "waifu2x-upconv7", "--recipe", "conv-w8a8-static", "-q"]
    assert main([*argv, "--out", str(out), "--calib-images", str(folder)]) == 0
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["calibration"]["corpus"] == f"crops of {folder}"
    assert manifest["calibration"]["shape"] == [3, 64, 64]
    capsys.readouterr()
    deep, small = tmp_path / "deep.tiff", tmp_path / "small.png"
    Image.fromarray(rng.random((140, 160), dtype=np.float32)).save(deep)
    Image.fromarray(rng.integers(0, 256, (100, 160, 3), dtype=np.uint8)).save(small)
    bad = {str(deep): "8-bit images or 16-bit grey ones only",
           str(small): "sides of at least 128", str(tmp_path / "none"): "no such image",
           str(tmp_path): "not a readable image"}  # fmt: skip
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for path, message in bad.items():
        assert main([*argv, "--out", str(tmp_path / "x"), "--calib-images", path]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()  # nothing half-written
    assert main([*argv, "--out", str(tmp_path / "x"), "--calib", "wiki"]) == 2
    assert "--calib-images" in capsys.readouterr().err
    assert main(["quantize", "dcgan-faces", "--recipe", "conv-w8a8-static", "--out",
                 str(tmp_path / "x"), "--calib-images", str(folder)]) == 2  # fmt: skip
    assert "takes no images" in capsys.readouterr().err


def test_quantize_scores_the_folder_on_held_out_images(small_sr, monkeypatch, tmp_path, capsys):
    """--eval-images: the quantized folder scored as `lowbit eval --images` scores it, recorded
    in the manifest; calibration and evaluation images may not share a file."""
    from PIL import Image

    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", small_sr)
    rng = np.random.default_rng(2)
    calib, held = tmp_path / "calib", tmp_path / "held"
    for folder, names in ((calib, ("c.png",)), (held, ("h1.png", "h2.png"))):
        folder.mkdir()
        for name in names:
            array = rng.integers(0, 256, (130, 140, 3), dtype=np.uint8)
            Image.fromarray(array).save(folder / name)
    out = tmp_path / "sr"
    argv = ["quantize", "waifu2x-upconv7", "--recipe", "conv-w8a8-static", "--calib-images",
            str(calib), "--out", str(out), "-q"]  # fmt: skip
    assert main([*argv, "--eval-images", str(held)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].startswith("h1.png: PSNR") and lines[-1].startswith("2 images; PSNR")
    recorded = json.loads((out / "lowbit.json").read_text())["metrics"]["eval"]
    assert recorded["images"] == 2 and recorded["images_path"] == str(held)
    assert main(["eval", str(out), "--images", str(held), "--ref", "waifu2x-upconv7",
                 "--json"]) == 0  # fmt: skip
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["psnr"] == pytest.approx(recorded["psnr"])
    assert again["ref_psnr"] == pytest.approx(recorded["ref_psnr"])
    bad = {("--eval-images", str(calib / "c.png")): "c.png is in both",
           ("--eval-images", str(tmp_path / "none")): "no such image"}  # fmt: skip
    for extra, message in bad.items():
        assert main([*argv, "--overwrite", *extra]) == 2
        assert message in capsys.readouterr().err
    (held / "broken.png").write_bytes(b"not a png")  # refused before anything is written
    fresh = ["quantize", "waifu2x-upconv7", "--recipe", "w8-rtn", "--out", str(tmp_path / "n")]
    assert main([*fresh, "--eval-images", str(held)]) == 2
    assert "broken.png: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    assert main(["quantize", "dcgan-faces", "--recipe", "w8-rtn", "--out", str(tmp_path / "g"),
                 "--eval-images", str(held)]) == 2  # fmt: skip
    assert "dcgan-faces takes no images" in capsys.readouterr().err


def test_a_super_resolution_model_is_scored_on_the_users_images(small_sr, monkeypatch,
                                                                 tmp_path, capsys):  # fmt: skip
    """--images: each image's centre, downscaled 2x, upscaled by the model and compared with
    the image (and with --ref's upscale); images of different sizes, one line each."""
    from PIL import Image

    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", small_sr)
    rng = np.random.default_rng(1)
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, shape in (("b.png", (48, 64, 3)), ("a.jpg", (90, 70, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
    out = tmp_path / "sr"
    assert main(["quantize", "waifu2x-upconv7", "--recipe", "conv-w8a8-static", "--out",
                 str(out), "-q"]) == 0  # fmt: skip
    capsys.readouterr()
    grid = tmp_path / "grid.png"
    argv = ["eval", str(out), "--images", str(folder), "--ref", "waifu2x-upconv7"]
    assert main([*argv, "--crop", "64", "--json", "--grid", str(grid)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["per_image"]
    assert result["images"] == 2 and [r["image"] for r in rows] == ["a.jpg", "b.png"]
    assert result["psnr"] == pytest.approx((rows[0]["psnr"] + rows[1]["psnr"]) / 2)
    assert all(r["psnr_ref"] > 20 and 0 < r["ref_psnr"] < 60 for r in rows)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv, "--crop", "0"]) == 0  # whole images: other figures for a.jpg
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("a.jpg: PSNR") and "vs ground truth" in lines[0]
    assert lines[2].startswith("2 images; PSNR") and "images/s" in lines[2]
    assert f"{rows[1]['psnr']:.2f} dB" in lines[1]  # b.png is under 64 x 64: the same
    bad = {("--crop", "5"): "--crop 5: give 32 or more", ("--fd",): "--fd compares"}
    for extra, message in bad.items():
        assert main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["eval", "dcgan-faces", "--images", str(folder)]) == 2
    assert "dcgan-faces takes no images" in capsys.readouterr().err
    assert main(["eval", "smollm2-135m", "--images", str(folder)]) == 2
    assert "--images is for image models" in capsys.readouterr().err
    assert main(["eval", "waifu2x-upconv7", "--crop", "64"]) == 2  # scored whole without --images
    assert "--crop is for --images" in capsys.readouterr().err


def test_generate_writes_a_generators_samples_and_an_upscale(
    random_gan, small_sr, monkeypatch, tmp_path, capsys
):
    """`lowbit generate` on image models: the PNGs hold the model's outputs, rounded to 8 bits
    (a grid in one file, or a folder with its record); what does not apply is refused."""
    from PIL import Image

    from lowbit.eval.image import outputs
    from lowbit.models import images

    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", small_sr)
    entry = images.image_models()["dcgan-faces"]
    grid = tmp_path / "faces.png"
    assert main(["generate", "dcgan-faces", "--count", "3", "--seed", "5", "--out", str(grid),
                 "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 3 and summary["size"] == [64, 64]
    want = outputs(images.dcgan_faces(), entry.sample(3, 5), entry.output_range)
    with Image.open(grid) as image:  # 2 x 2 cells, the last one empty
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    assert pixels.shape == (3, 128, 128) and int(pixels[:, 64:, 64:].max()) == 0
    assert torch.equal(pixels[:, 64:, :64], want[2].mul(255).round().to(torch.uint8))
    folder = tmp_path / "faces"
    argv = ["generate", "dcgan-faces", "--count", "2", "--out", str(folder)]
    assert main(argv) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["lowbit_images.json", "sample_0000.png", "sample_0001.png"]
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file")
    assert main(["generate", "dcgan-faces", "--out", str(mine), "--overwrite"]) == 2
    assert "not a folder lowbit wrote" in capsys.readouterr().err
    photo = mine / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)).save(photo)
    big = tmp_path / "photo-2x.png"
    assert main(["generate", "waifu2x-upconv7", "--image", str(photo), "--out", str(big)]) == 0
    with Image.open(big) as image:
        assert image.size == (60, 40)
        whole = np.asarray(image).copy()
    scan = tmp_path / "scan.png"  # 16-bit grey in, 16-bit grey out
    Image.fromarray(np.asarray(Image.open(photo).convert("L")).astype(np.uint16) * 257).save(scan)
    assert main(["generate", "waifu2x-upconv7", "--image", str(scan), "--out",
                 str(tmp_path / "scan-2x.png")]) == 0  # fmt: skip
    with Image.open(tmp_path / "scan-2x.png") as image:
        assert image.mode.startswith("I;16") and image.size == (60, 40)
    grey = tmp_path / "grey.png"  # a grey image in, a grey image out
    Image.fromarray(np.asarray(Image.open(photo).convert("L"))).save(grey)
    assert main(["generate", "waifu2x-upconv7", "--image", str(grey), "--out",
                 str(tmp_path / "grey-2x.png")]) == 0  # fmt: skip
    with Image.open(tmp_path / "grey-2x.png") as image:
        assert image.mode == "L" and image.size == (60, 40)
    tiled = tmp_path / "tiled.png"  # windows of 20 x 20 inputs: the same pixels
    assert main(["generate", "waifu2x-upconv7", "--image", str(photo), "--out", str(tiled),
                 "--tile", "20"]) == 0  # fmt: skip
    with Image.open(tiled) as image:
        assert np.array_equal(np.asarray(image), whole)
    bad = {("dcgan-faces", "--out", str(tmp_path / "x.png"), "--image", str(photo)):
           "dcgan-faces takes no images",
           ("dcgan-faces", "--prompt", "a face"): "it takes no prompt",
           ("dcgan-faces",): "give --out",
           ("waifu2x-upconv7", "--out", str(tmp_path / "y.png")): "give --image",
           ("waifu2x-upconv7", "--image", str(mine), "--out", str(tmp_path / "y.png"),
            "--count", "2"): "--count is for generators",
           ("smollm2-135m", "--out", "x.png"): "--out is for image models",
           ("smollm2-135m", "--tile", "64"): "--tile is for image models",
           ("dcgan-faces", "--out", str(tmp_path / "x.png"), "--tile", "64"):
           "--tile: dcgan-faces takes no images",
           ("waifu2x-upconv7", "--image", str(photo), "--out", str(tmp_path / "y.png"),
            "--tile", "14"): "give more than 14 pixels",
           ("dcgan-faces", "--out", str(tmp_path / "z.png"), "--kv-bits", "4"):
           "--kv-bits"}  # fmt: skip
    for extra, message in bad.items():
        assert main(["generate", *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_report_puts_an_image_models_variants_side_by_side(random_gan, small_sr, monkeypatch,
                                                            tmp_path, capsys):  # fmt: skip
    """`lowbit report` of an image model: each variant quantized, saved, reloaded and scored
    against fp32 on the same inputs, with a grid per variant; --images for super-resolution."""
    from PIL import Image

    out = tmp_path / "report"
    argv = ["report", "dcgan-faces", "--variants", "conv-w8a8-static", "--out", str(out), "-q"]
    assert main(argv) == 0
    data = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["fp32", "conv-w8a8-static"]  # fp32 added as the reference
    q = rows["conv-w8a8-static"]
    assert q["psnr_ref"] > 30 and q["images"] == 256 and q["images_per_s_batch16"] > 0
    assert q["weight_mb"] < rows["fp32"]["weight_mb"] / 3 and "psnr_ref" not in rows["fp32"]
    assert q["ms_per_image"] == pytest.approx(1000 / q["images_per_s"])
    assert (out / "grid_conv-w8a8-static.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "variants" / "conv-w8a8-static" / "lowbit.json").is_file()
    md = (out / "report.md").read_text()
    assert "![conv-w8a8-static](grid_conv-w8a8-static.png)" in md and "| PSNR vs fp32 dB |" in md
    assert "PSNR vs truth" not in md  # a generator has no ground truth: no empty column
    assert "| conv-w8a8-static " in capsys.readouterr().out
    monkeypatch.setattr("lowbit.models.images.waifu2x_upconv7", small_sr)
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        pixels = np.random.default_rng(len(name)).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    sr = tmp_path / "sr"
    assert main(["report", "waifu2x-upconv7", "--variants", "w8-rtn", "--images", str(folder),
                 "--out", str(sr), "-q"]) == 0  # fmt: skip
    rows = {r["variant"]: r for r in json.loads((sr / "report.json").read_text())["rows"]}
    assert rows["w8-rtn"]["images"] == 2 and rows["w8-rtn"]["ref_psnr"] == rows["fp32"]["psnr"]
    assert [r["image"] for r in rows["w8-rtn"]["per_image"]] == ["a.png", "b.png"]
    capsys.readouterr()
    bad = {("dcgan-faces", "--calib", "wiki"): "--calib names a text corpus",
           (str(out / "variants" / "conv-w8a8-static"),): "already quantized",
           ("dcgan-faces", "--images", str(folder)): "dcgan-faces takes no images",
           ("waifu2x-upconv7", "--images", str(folder), "--crop", "3"): "--crop 3",
           ("waifu2x-upconv7", "--crop", "64"): "--crop is for --images",
           ("smollm2-135m", "--images", str(folder)): "--images is for image models"}  # fmt: skip
    for extra, message in bad.items():
        assert main(["report", *extra, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_the_class_conditional_generator_quantizes_and_reloads(monkeypatch, tmp_path, capsys):
    """cdcgan-eyes takes latent + class index in one tensor; a narrow random copy stands in
    for its 12.9M-parameter checkpoint (scored under slow in tests/models/test_cdcgan.py; no
    --eval here: SSIM on 256 128x128 samples alone takes seconds)."""
    from lowbit.models.images.cdcgan import CDCGANGenerator, cycling_classes
    from lowbit.models.load import load_model

    def build() -> CDCGANGenerator:
        torch.manual_seed(3)
        return CDCGANGenerator(ngf=4).eval()

    monkeypatch.setattr("lowbit.models.images.cdcgan_eyes", build)
    monkeypatch.setattr("lowbit.models.images.CDCGANGenerator", build)  # the reload's skeleton
    out = tmp_path / "eyes-w8a8"
    assert main(["quantize", "cdcgan-eyes", "--recipe", "conv-w8a8-static", "--out", str(out),
                 "--json", "-q"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layers"] == 6 and 8 <= summary["bits_per_weight"] < 8.1
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["source"] == {"model": "cdcgan-eyes", "kind": "image"}
    assert manifest["calibration"]["shape"] == [101, 1, 1]
    x = cycling_classes(torch.randn(4, 100))
    with torch.no_grad():
        got, want = load_model(str(out)).model(x), build()(x)
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 1e-2


def test_analyze_measures_each_convolution_by_output_error(random_gan, tmp_path, capsys):
    """The same measurement --target-bits allocates from, printed and saved."""
    saved = tmp_path / "sens.json"
    assert main(["analyze", "dcgan-faces", "--recipe", "w4-rtn-channel", "--candidates", "4",
                 "8", "--calib-samples", "8", "--out", str(saved), "-q"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "5 layers x 2 formats, 8 calibration inputs, output MSE" in out
    data = json.loads(saved.read_text())
    assert data["metric"] == "mse" and data["tokens"] == 8 and len(data["layers"]) == 5
    for layer in data["layers"].values():  # 4 bits damage each layer more than 8
        assert layer["mse"]["int4"] > layer["mse"]["int8"] > 0
    assert main(["analyze", "dcgan-faces", "--recipe", "w8-rtn", "--calib", "wiki"]) == 2
    assert "--calib names a text corpus" in capsys.readouterr().err
    assert main(["analyze", "dcgan-faces", "--recipe", "w8-rtn", "--calib-images",
                 str(tmp_path)]) == 2  # fmt: skip
    assert "takes no images" in capsys.readouterr().err


def test_an_image_model_is_not_quantized_by_several_processes(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from lowbit.calibration.group import Group

    job = SimpleNamespace(distributed=True, main=True)
    monkeypatch.setattr(Group, "current", staticmethod(lambda: job))
    code = main(["quantize", "dcgan-faces", "--recipe", "conv-w8a8-static", "--out",
                 str(tmp_path / "q")])  # fmt: skip
    assert code == 2 and "quantized in one process" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
