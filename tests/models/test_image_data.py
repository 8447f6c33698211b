"""Reading users' image files as any image tool does: orientation, odd modes, odd folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.errors import LowbitError
from lowbit.models.images.data import image_from_bytes, named_images


def test_a_photo_with_an_exif_orientation_is_read_upright(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32, 0] = 255  # left half red, right half blue
    pixels[:, 32:, 2] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    image.save(tmp_path / "phone.png", exif=exif.tobytes())
    ((_, x, _),) = named_images(str(tmp_path / "phone.png"), channels=3, min_side=1)
    assert x.shape == (1, 3, 64, 32)  # as a viewer shows it: tall
    assert x[0, 0, 0, 0] == 1 and x[0, 2, -1, 0] == 1  # red on top, blue below
    body = (tmp_path / "phone.png").read_bytes()
    assert image_from_bytes(body, 3, 10**6).pixels.shape == (1, 3, 64, 32)


def test_black_and_white_files_are_grey_and_other_colour_spaces_are_refused(tmp_path):
    grey = np.arange(40 * 40, dtype=np.uint8).reshape(40, 40)
    Image.fromarray(grey > 128).save(tmp_path / "bw.png")
    ((_, x, bits),) = named_images(str(tmp_path / "bw.png"), channels=3, min_side=1)
    assert bits == 8 and torch.equal(x[0, 0], torch.from_numpy(grey > 128).float())
    Image.fromarray(np.dstack([grey] * 3)).convert("LAB").save(tmp_path / "lab.tif")
    with pytest.raises(LowbitError, match="LAB pixels"):
        named_images(str(tmp_path / "lab.tif"), channels=3, min_side=1)
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "i32.tif")  # 32-bit integers
    with pytest.raises(LowbitError, match="int32 pixels"):
        named_images(str(tmp_path / "i32.tif"), channels=3, min_side=1)


def test_more_pixels_than_pillow_takes_is_one_line_naming_the_size(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 20000x20000 RGB, no data
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(LowbitError, match="too many pixels"):
        named_images(str(tmp_path / "bomb.png"), channels=3, min_side=1)
    with pytest.raises(LowbitError, match="too many pixels.*at most 4194304"):
        image_from_bytes(png, 3, 2048 * 2048)


def test_a_folder_skips_hidden_files_and_folders_and_reads_a_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "a.tif", save_all=True, append_images=frames[1:])
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's AppleDouble file
    (tmp_path / "b.png").mkdir()
    ((name, x, _),) = named_images(str(tmp_path), channels=3, min_side=1)
    assert name == "a.tif" and torch.all(x * 255 == 10)


def test_a_generators_first_samples_do_not_depend_on_how_many_are_drawn():
    """`generate --count 5` draws the first 5 of `--count 16`'s latents (torch's sampler
    draws a tail that is not a multiple of 16 values differently)."""
    from lowbit.models.images.data import latents

    every = latents(64, 100, seed=3)
    for count in (1, 5, 16, 17, 63):
        assert torch.equal(latents(count, 100, seed=3), every[:count])
    plain = torch.randn(256, 100, 1, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(latents(256, 100, seed=0), plain)  # the evaluation latents, unchanged
