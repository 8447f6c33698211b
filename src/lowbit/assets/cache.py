"""Where lowbit keeps downloaded and converted assets, and how it knows they are intact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from lowbit.assets.atomic import write_text_atomic


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
        if json.loads(sidecar.read_text(encoding="utf-8")) == stamp:
            return True
    if sha256_file(path) != sha256:
        return False
    with contextlib.suppress(OSError):
        write_text_atomic(sidecar, json.dumps(stamp))
    return True
