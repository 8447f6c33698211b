"""The streaming safetensors writer: readable by safetensors, byte-reproducible, checked."""

import struct

import pytest
import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.models.tensorfile import read_header, write_file


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.codes": torch.randint(0, 255, (3, 5), dtype=torch.uint8, generator=g),
        "a.weight": torch.randn(4, 3, generator=g),
        "c.scale": torch.randn(7, generator=g).half(),
        "d.bf": torch.randn(2, 2, generator=g).bfloat16(),
        "e.empty": torch.zeros(0, 3),
    }


def test_written_file_is_read_back_by_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    write_file(path, tensors(), {"producer": "test"})
    back = load_file(str(path))
    for name, t in tensors().items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_same_tensors_in_any_order_give_the_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_file(a, tensors(), {"x": "1", "y": "2"})
    write_file(b, dict(reversed(list(tensors().items()))), {"y": "2", "x": "1"})
    assert a.read_bytes() == b.read_bytes()


def test_entries_are_copied_byte_for_byte(tmp_path):
    src = tmp_path / "src.safetensors"
    write_file(src, tensors(), {})
    entries, _ = read_header(src)
    out = tmp_path / "out.safetensors"
    write_file(out, {"copied": entries["a.weight"], "fresh": torch.ones(2)}, {})
    back = load_file(str(out))
    assert torch.equal(back["copied"], tensors()["a.weight"])


def test_truncated_and_damaged_files_are_named(tmp_path):
    path = tmp_path / "x.safetensors"
    write_file(path, tensors(), {})
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(LowbitError, match="x.safetensors is truncated"):
        read_header(path)
    path.write_bytes(data[:20])
    with pytest.raises(LowbitError, match="x.safetensors is truncated"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(LowbitError, match="not a readable safetensors file"):
        read_header(path)
    body = b'{"t":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(8))
    with pytest.raises(LowbitError, match="'t' spans 8 bytes, its shape \\[4\\] needs 16"):
        read_header(path)


def test_write_errors_are_one_line(tmp_path):
    with pytest.raises(LowbitError, match="cannot write"):
        write_file(tmp_path / "missing" / "x.safetensors", tensors(), {})
