"""How lowbit writes what it outputs: completely or not at all, never over a user's files.

Every file and folder is first written under a temporary name beside its destination,
``.<name>.<pid>.<random>.tmp`` (a name too long to take those tags is cut, see
:func:`hidden_stem`), and renamed into place once complete. A process killed mid-write
(``kill -9``, out of memory) leaves only such a temporary; the next write to the same
destination removes those whose process is gone (:func:`sweep_stale`). Replacing an existing
folder (``--overwrite``) is allowed only for an empty folder or one lowbit wrote
(:func:`prepare_out`), so a mistyped ``--out`` cannot delete a user's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError

# The record files by which a folder is recognised as lowbit's own: a quantized model's
# manifest, a report, the ONNX and compressed-tensors exports' notes, generated images' note.
# Each is a JSON object that names lowbit ("producer": "lowbit", or the manifest's
# "lowbit_version"); a file of the same name written by anything else does not count.
RECORDS = ("lowbit.json", "report.json", "lowbit_onnx.json", "lowbit_export.json",
           "lowbit_images.json")  # fmt: skip
NAME_ROOM = 180  # bytes of a destination's name kept in its temporaries' (255 in all)
PRODUCER = {"producer": "lowbit"}  # what every record but the manifest holds


def lowbit_record(path: Path) -> bool:
    """Whether ``path`` is one of lowbit's record files (by its name and content)."""
    if path.name not in RECORDS or not path.is_file() or path.stat().st_size > 64 << 20:
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # reports and image notes written before they carried "producer" have these keys
    legacy = {"report.json": {"rows", "protocol", "machine"},
              "lowbit_images.json": {"model", "images"}}.get(path.name)  # fmt: skip
    return isinstance(data, dict) and (
        data.get("producer") == "lowbit" or "lowbit_version" in data
        or (legacy is not None and legacy <= data.keys()))  # fmt: skip


def prepare_out(out: Path, overwrite: bool, folder: bool = True,
                inputs: tuple[str | Path, ...] = (), option: str = "--out") -> None:  # fmt: skip
    """Fail before any work if ``out`` (a folder, or a file with ``folder=False``) cannot be
    written: it is, holds or lies inside the current folder's path or one of the run's
    ``inputs``, it exists (without ``overwrite``), it is not what will replace it, or a folder
    that is neither empty nor lowbit's (with ``overwrite``), or no folder on its path can be
    written. Temporaries that killed writes of ``out`` left beside it are removed."""
    out = Path(out)
    target = out.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents:
        raise LowbitError(f"{option} {out} is the current folder or holds it, which a finished "
                          f"run would replace: choose another {option}")  # fmt: skip
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if source.exists() and (target == source or target in source.parents
                                or source in target.parents):  # fmt: skip
            raise LowbitError(f"{option} {out} is, holds or lies inside the input {given}: "
                              f"choose an {option} beside it")  # fmt: skip
    sweep_stale(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise LowbitError(f"{out} already exists; choose another {option} or pass --overwrite")
        if out.is_symlink() or out.is_dir() != folder:
            what = "a link" if out.is_symlink() else "a folder" if out.is_dir() else "a file"
            raise LowbitError(f"{out} is {what}; --overwrite replaces only what lowbit writes "
                              f"there: choose another {option}")  # fmt: skip
        if folder:
            names = sorted(p.name for p in out.iterdir())
            if names and not any(lowbit_record(out / n) for n in RECORDS):
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise LowbitError(f"{out} is not a folder lowbit wrote (it holds {shown}); "
                                  f"--overwrite replaces only lowbit outputs and empty "
                                  f"folders: choose another {option}")  # fmt: skip
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"cannot write {out}: {parent} is not a writable folder")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_png_atomic(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as a PNG at ``path`` atomically, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return path


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
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

    With ``overwrite``, an existing ``path`` (empty, or lowbit's) is replaced after the new
    folder is complete; an interrupted write never leaves a partial folder at ``path``.
    """
    path = Path(path)
    prepare_out(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        publish_dir(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Rename the finished folder ``tmp`` to ``path`` (same file system); with ``overwrite``
    an existing ``path`` (checked by :func:`prepare_out`) is moved aside first, removed after."""
    _as_if_created(tmp)
    if path.exists() and overwrite:
        prepare_out(path, overwrite)
        old = Path(f"{tmp}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)  # fails if path is a non-empty folder (checked by callers)


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temporaries that writes of ``path`` by processes now gone left beside it;
    returns what was removed."""
    path = Path(path)
    pattern = re.compile(re.escape(f"{hidden_stem(path)}.") + r"(\d+)\.[a-z0-9_]{8}\.tmp(\.old)?$")
    removed = []
    with contextlib.suppress(OSError):
        for sibling in path.parent.iterdir():
            found = pattern.match(sibling.name)
            if found is None or _alive(int(found.group(1))):
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)
            removed.append(sibling)
    return removed


def hidden_stem(path: Path) -> str:
    """``.NAME``: how the hidden files and folders lowbit keeps beside ``path`` begin. A name
    too long to take their tags within a file name's 255 bytes is cut, and a digest of the
    whole name keeps two such destinations apart."""
    name = Path(path).name
    raw = name.encode()
    if len(raw) <= NAME_ROOM:
        return f".{name}"
    tag = hashlib.blake2b(raw, digest_size=6).hexdigest()
    return f".{raw[: NAME_ROOM - 13].decode(errors='ignore')}~{tag}"


def _prefix(path: Path) -> str:
    return f"{hidden_stem(path)}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no process has): leave it
    return True


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
