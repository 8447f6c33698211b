"""Where lowbit keeps downloaded and converted assets, and how it writes them safely."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``."""
    if os.environ.get("LOWBIT_CACHE"):
        root = Path(os.environ["LOWBIT_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "lowbit"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(path: Path, sha256: str) -> bool:
    """Whether ``path`` exists with this sha256.

    The full hash is computed once per (size, mtime) of the file and remembered in a sidecar
    ``<name>.verified`` file, so repeated loads of a large cached file do not re-read it, while a
    truncated or rewritten file (new size or mtime) is hashed again.
    """
    if not path.is_file():
        return False
    stat = path.stat()
    stamp = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = path.with_name(path.name + ".verified")
    with contextlib.suppress(OSError, ValueError):
        if json.loads(sidecar.read_text()) == stamp:
            return True
    if sha256_file(path) != sha256:
        return False
    with contextlib.suppress(OSError):
        write_text_atomic(sidecar, json.dumps(stamp))
    return True


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_if_created(path: Path) -> None:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (owner-only) the permissions a
    plain ``open``/``mkdir`` would have given it, and the same to the files directly inside."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.iterdir():
            if child.is_file():
                os.chmod(child, 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _as_if_created(Path(tmp))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``, renamed to ``path`` only if the block succeeds.

    With ``overwrite``, an existing ``path`` is replaced after the new folder is complete; an
    interrupted write never leaves a partial folder at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        publish_dir(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Rename the finished folder ``tmp`` to ``path`` (same file system); with ``overwrite``
    an existing ``path`` is moved aside first and removed after."""
    _as_if_created(tmp)
    if path.exists() and overwrite:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)  # fails if path is a non-empty folder (checked by callers)
