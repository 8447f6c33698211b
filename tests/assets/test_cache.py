import io
import tarfile
import zipfile

import pytest

from lowbit.assets import atomic_dir, extract_member, sha256_file, verified
from lowbit.errors import LowbitError


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_overwrite_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "lowbit.json").write_text(
        '{"lowbit_version": "old"}'
    )  # a lowbit output: --overwrite may replace it
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError
    assert (target / "lowbit.json").exists()
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_verified_detects_corruption_and_truncation(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"0123456789" * 100)
    digest = sha256_file(path)
    assert verified(path, digest)
    assert verified(path, digest)  # remembered
    data = bytearray(path.read_bytes())
    data[500] ^= 1
    path.write_bytes(bytes(data))
    assert not verified(path, digest)
    path.write_bytes(b"0123456789" * 50)
    assert not verified(path, digest)


def _zip(path, name, data):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, data)


def test_extract_member_from_zip_and_tar(tmp_path):
    _zip(tmp_path / "a.whl", "pkg/data.bin", b"payload")
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1/data.bin")
        info.size = 7
        tf.addfile(info, io.BytesIO(b"payload"))
    (tmp_path / "ref").write_bytes(b"payload")
    digest = sha256_file(tmp_path / "ref")
    for archive, member in [("a.whl", "pkg/data.bin"), ("b.tar.gz", "pkg-1/data.bin")]:
        out = extract_member(tmp_path / archive, member, tmp_path / f"{archive}.out", digest)
        assert out.read_bytes() == b"payload"
    with pytest.raises(LowbitError, match="does not match"):
        extract_member(tmp_path / "a.whl", "pkg/data.bin", tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(LowbitError, match="has no file"):
        extract_member(tmp_path / "a.whl", "pkg/nope", tmp_path / "x", digest)
