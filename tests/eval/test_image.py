"""Image metrics (torchmetrics) and the super-resolution protocol."""

import math

import pytest
import torch

pytest.importorskip("torchmetrics", reason="image metrics need the image extra")

from lowbit.errors import LowbitError
from lowbit.eval.image import psnr, ssim
from lowbit.models.images.data import bicubic_2x, super_resolution_pair


def test_psnr_and_ssim_against_their_definitions():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 32, 32, generator=g)
    b = (a + 0.01 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    mse = float((a - b).pow(2).mean())
    assert psnr(b, a) == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6) and 0.5 < ssim(b, a) < 1
    each = [psnr(b[:, :, i : i + 8], a[:, :, i : i + 8]) for i in (0, 8, 16, 24)]
    pair = torch.cat([b[:, :, i : i + 8] for i in (0, 8, 16, 24)])
    truth = torch.cat([a[:, :, i : i + 8] for i in (0, 8, 16, 24)])
    assert psnr(pair, truth, per_image=True) == pytest.approx(sum(each) / 4, rel=1e-5)
    with pytest.raises(LowbitError, match="share one"):
        psnr(a, a[..., :16])


def test_super_resolution_pair_halves_and_bicubic_doubles():
    image = torch.rand(1, 3, 33, 40)
    small, truth = super_resolution_pair(image)
    assert small.shape == (1, 3, 16, 20) and truth.shape == (1, 3, 32, 40)
    assert bicubic_2x(small).shape == truth.shape


def test_a_scoring_pair_is_the_images_centre_then_the_protocol():
    from lowbit.models.images.data import sr_scoring_pair

    image = torch.rand(1, 3, 70, 101)
    small, truth = sr_scoring_pair(image, side=40)
    assert torch.equal(truth, image[..., 15:55, 30:70]) and small.shape == (1, 3, 20, 20)
    small, truth = sr_scoring_pair(image, side=0)  # whole, cropped to even sides
    assert torch.equal(truth, image[..., :70, :100]) and small.shape == (1, 3, 35, 50)
    assert torch.equal(sr_scoring_pair(image, side=512)[1], truth)  # smaller than side: whole


def test_pairs_of_any_sizes_are_scored_each_and_averaged():
    from lowbit.eval.image import evaluate_pairs

    g = torch.Generator().manual_seed(0)
    pairs = [(f"{h}x{w}", torch.rand(1, 3, h, w, generator=g), torch.rand(1, 3, 2 * h, 2 * w,
              generator=g)) for h, w in ((16, 24), (20, 20))]  # fmt: skip
    model, ref = torch.nn.Upsample(scale_factor=2), torch.nn.Upsample(scale_factor=2,
                                                                       mode="bilinear")  # fmt: skip
    result = evaluate_pairs(model, pairs, ref, (0.0, 1.0))
    rows = result["per_image"]
    assert result["images"] == 2 and [r["image"] for r in rows] == ["16x24", "20x20"]
    for (_, x, truth), row in zip(pairs, rows, strict=True):
        got, want = model(x), ref(x)
        assert row["psnr"] == pytest.approx(psnr(got, truth), rel=1e-6)
        assert row["ref_psnr"] == pytest.approx(psnr(want, truth), rel=1e-6)
        assert row["psnr_ref"] == pytest.approx(psnr(got, want), rel=1e-6)
        assert row["ssim_ref"] == pytest.approx(ssim(got, want), rel=1e-6)
    for key in ("psnr", "ssim", "ref_psnr", "ref_ssim", "psnr_ref", "ssim_ref"):
        assert result[key] == pytest.approx((rows[0][key] + rows[1][key]) / 2, rel=1e-6)
    assert result["images_per_s"] > 0
    assert set(evaluate_pairs(model, pairs, None, (0.0, 1.0))["per_image"][0]) == {
        "image", "psnr", "ssim"}  # fmt: skip
    with pytest.raises(LowbitError, match="no images"):
        evaluate_pairs(model, [], None, (0.0, 1.0))


def test_a_grid_takes_images_of_different_sizes(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from lowbit.eval.image_grid import save_grid

    a, b = torch.rand(3, 32, 48), torch.rand(3, 40, 40)
    path = save_grid(tmp_path / "g.png", [a, b], [a.flip(1), b * 0.5])
    with Image.open(path) as image:
        assert image.size[0] > 0
    with pytest.raises(LowbitError, match="alike pair by pair"):
        save_grid(tmp_path / "h.png", [a, b], [a, a])
    assert not (tmp_path / "h.png").exists()


def test_an_rgb_model_reads_grey_palette_and_alpha_images_as_rgb(tmp_path):
    np = pytest.importorskip("numpy")
    from PIL import Image

    from lowbit.models.images.data import named_images

    grey = np.arange(40 * 50, dtype=np.uint8).reshape(40, 50)
    Image.fromarray(grey).save(tmp_path / "a_grey.png")
    rgba = np.dstack([np.full((40, 50), v, np.uint8) for v in (10, 20, 30, 128)])
    Image.fromarray(rgba).save(tmp_path / "b_rgba.png")
    Image.fromarray(grey).convert("P").save(tmp_path / "c_palette.png")
    (a, x, bits), (_, y, _), (_, z, _) = named_images(str(tmp_path), channels=3, min_side=32)
    assert a == "a_grey.png" and bits == 8 and x.shape == y.shape == z.shape == (1, 3, 40, 50)
    for image in (x, z):  # grey replicated into R, G and B
        assert torch.equal(image[0, 0], torch.from_numpy(grey).float() / 255)
        assert torch.equal(image[0, 0], image[0, 1]) and torch.equal(image[0, 1], image[0, 2])
    assert torch.equal(y[0, :, 0, 0] * 255, torch.tensor([10.0, 20.0, 30.0]))  # alpha dropped
    with pytest.raises(LowbitError, match="4 channel.*takes 1-channel"):  # no conversion to grey
        named_images(str(tmp_path / "b_rgba.png"), channels=1, min_side=32)


def test_a_16_bit_grey_file_keeps_its_precision(tmp_path):
    np = pytest.importorskip("numpy")
    from PIL import Image

    from lowbit.models.images.data import named_images

    deep = (np.arange(40 * 50).reshape(40, 50) * 31).astype(np.uint16)  # not multiples of 257
    Image.fromarray(deep).save(tmp_path / "scan.png")
    ((name, x, bits),) = named_images(str(tmp_path / "scan.png"), channels=3, min_side=32)
    assert name == "scan.png" and bits == 16 and x.shape == (1, 3, 40, 50)
    torch.testing.assert_close(x[0, 2], torch.from_numpy(deep.astype("float32")) / 65535)
    Image.fromarray(np.zeros((40, 50, 3), np.float32)[..., 0]).save(tmp_path / "f.tiff")
    with pytest.raises(LowbitError, match="8-bit images or 16-bit grey ones only"):
        named_images(str(tmp_path / "f.tiff"), channels=3, min_side=32)


def test_a_model_against_itself_scores_the_identical_cap_not_infinity():
    import json

    from lowbit.eval.image import IDENTICAL_DB, _quality

    model = torch.nn.Conv2d(3, 3, 1)
    result = _quality(model, torch.rand(2, 3, 8, 8), None, model, (0.0, 1.0))
    assert result["psnr_ref"] == IDENTICAL_DB
    json.loads(json.dumps(result), parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))
