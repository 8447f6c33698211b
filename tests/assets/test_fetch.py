import hashlib

import pytest

from lowbit.assets import Archive, cache_dir, fetch_archive
from lowbit.assets import fetch as fetch_module
from lowbit.errors import LowbitError

PAYLOAD = b"a wheel's bytes"
ARCHIVE = Archive("demo==1.0", "demo-1.0-py3-none-any.whl", hashlib.sha256(PAYLOAD).hexdigest())


@pytest.fixture
def fake_pip(monkeypatch):
    calls = []

    def download(archive, where):
        calls.append(archive.requirement)
        (where / archive.filename).write_bytes(PAYLOAD)

    monkeypatch.setattr(fetch_module, "_pip_download", download)
    return calls


def test_downloads_once_then_uses_the_cache(fake_pip):
    path = fetch_archive(ARCHIVE)
    assert path.read_bytes() == PAYLOAD
    fetch_archive(ARCHIVE)
    assert fake_pip == ["demo==1.0"]


def test_corrupt_cache_is_fetched_again(fake_pip):
    path = fetch_archive(ARCHIVE)
    path.write_bytes(PAYLOAD[:5])  # truncated
    assert fetch_archive(ARCHIVE).read_bytes() == PAYLOAD
    assert len(fake_pip) == 2


def test_wrong_hash_from_the_index_is_an_error(fake_pip):
    bad = Archive("demo==1.0", ARCHIVE.filename, "0" * 64)
    with pytest.raises(LowbitError, match="pinned sha256"):
        fetch_archive(bad)
    assert not (cache_dir() / "archives" / ARCHIVE.filename).exists()


def test_pip_failure_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(fetch_module.sys, "executable", "/bin/false")
    with pytest.raises(LowbitError, match="could not download demo==1.0") as info:
        fetch_archive(ARCHIVE)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_members_are_read_from_one_opening_and_a_missing_one_is_named(tmp_path, kind):
    import io
    import tarfile
    import zipfile

    from lowbit.assets import list_members, read_member, read_members

    files = {f"d/{i}.txt": f"text {i}".encode() for i in range(5)} | {"d/x.bin": b"\0"}
    path = tmp_path / f"a.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    names = list_members(path, "d/", ".txt")
    assert names == sorted(n for n in files if n.endswith(".txt"))
    assert read_members(path, names) == [files[n] for n in names]
    assert read_member(path, "d/x.bin") == b"\0"
    with pytest.raises(LowbitError, match=f"a.{kind} has no file d/missing.txt"):
        read_members(path, [names[0], "d/missing.txt"])
