"""The work folder of a streamed run: what survives ``kill -9`` and lets the same command resume.

It lies beside ``--out`` as ``.<out>.lowbit-work`` and holds ``fingerprint.json`` (model,
recipe, calibration token ids, seed, lowbit version), one ``units/NNNNN.safetensors`` per
finished decoder block with its record ``units/NNNNN.json`` (written last: the commit mark), and
``hidden/after-NNNNN/``, the calibration hidden states entering the next block (one file per
batch; while a block runs, a spilling run writes its outputs into ``after-NNNNN.partial``).
Every file is written to a temporary name and renamed. Finishing assembles the shards inside the
work folder, renames the finished folder to ``--out`` and removes the work folder: nothing
outside it is ever half-written.

In a job of several processes, rank 0 keeps this folder; every other rank keeps only its own
hidden states and records in ``ranks/NNNNN/`` below it (on its own host's disk when the hosts
share no file system). Ranks may then stand one block apart when the job is killed, so each keeps
the inputs of the block before its last as well, and the rerun starts where all ranks can.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lowbit.assets import atomic_file, hidden_stem, publish_dir, write_text_atomic
from lowbit.errors import LowbitError
from lowbit.models.checkpoint import write_shards
from lowbit.models.tensorfile import Entry, Item, read_header, write_file

log = logging.getLogger(__name__)
FINGERPRINT = "fingerprint.json"
LOCK = "lock"
PUBLISHED = "published"  # written just before the finished folder is renamed to --out


def work_path(out: Path) -> Path:
    return Path(out).parent / f"{hidden_stem(out)}.lowbit-work"


def drop_published(out: Path) -> bool:
    """Remove the work folder of a run that published ``out`` but was stopped before it removed
    its work folder (whose units repeat ``out``'s weights); True if it did. Its finished folder
    was renamed away, so what is left is only that copy."""
    work = work_path(out)
    if not ((work / PUBLISHED).is_file() and not (work / "final").exists() and Path(out).exists()):
        return False
    log.info("removing %s, left by a run that published %s and was stopped", work, out)
    shutil.rmtree(work, ignore_errors=True)
    return True


def _named(key: str, saved: Any, now: Any) -> str:
    """How a fingerprint field that changed is named in the error."""
    if key == "world_size":  # (a one-process run records none)
        return f"number of processes (saved {saved or 1}, now {now or 1})"
    return key


class WorkFolder:
    """The resumable state of one run that writes ``out``."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], restart: bool = False,
                 rank: int = 0, keep: int = 1) -> None:  # fmt: skip
        self.out, self.keep = Path(out), keep
        self.path = work_path(self.out)
        if rank:
            self.path = self.path / "ranks" / f"{rank:05d}"
        self.digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
        self.bytes_written = 0
        self.write_seconds = 0.0
        self.started = False  # a finished block is being written (set by the runner)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LowbitError(f"cannot create the work folder {self.path}: "
                              f"{exc.strerror or exc}") from None  # fmt: skip
        self._lock = self._hold()
        if (self.path / FINGERPRINT).is_file() and not restart:
            self._check(fingerprint)
        else:  # new, restarted, or killed before its fingerprint: nothing in it to reuse
            for entry in self.path.iterdir():
                if entry.name != LOCK:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            (self.path / "units").mkdir()
            body = json.dumps({"sha256": self.digest, **fingerprint}, indent=1)
            write_text_atomic(self.path / FINGERPRINT, body)

    def _hold(self) -> Any:
        """The work folder's lock, held while this process lives (two runs writing the same
        ``out`` would resume each other's blocks and race to publish it). A POSIX record lock:
        the process's own, so a run retried in the same process (a notebook) takes it again."""
        handle = open(self.path / LOCK, "a+")  # noqa: SIM115 (held open: it is the lock)
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise LowbitError(f"another lowbit run is writing {self.out} (its work folder "
                              f"{self.path} is locked); wait for it to end or choose another "
                              f"--out") from None  # fmt: skip
        return handle

    def _check(self, fingerprint: dict[str, Any]) -> None:
        try:
            saved = json.loads((self.path / FINGERPRINT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        if saved.get("sha256") != self.digest:
            keys = sorted((set(saved) | set(fingerprint)) - {"sha256"})
            differ = [_named(k, saved.get(k), fingerprint.get(k)) for k in keys
                      if saved.get(k) != fingerprint.get(k)]  # fmt: skip
            what = f"another {', '.join(differ)}" if differ else "another run"
            raise LowbitError(f"{self.path} holds an unfinished run of {what}; pass --restart "
                              f"to discard it, or choose another --out")  # fmt: skip

    def _unit(self, index: int, suffix: str) -> Path:
        return self.path / "units" / f"{index:05d}.{suffix}"

    def records(self) -> list[dict[str, Any]]:
        """Records of the finished blocks 0, 1, ... (up to the first unfinished one)."""
        out = []
        while self._unit(len(out), "json").is_file():
            try:
                out.append(json.loads(self._unit(len(out), "json").read_text(encoding="utf-8")))
            except (OSError, ValueError):
                break
        return out

    def write_unit(self, index: int, tensors: Mapping[str, Item] | None, record: dict[str, Any],
                   hidden: Path | None = None,
                   side: Mapping[str, torch.Tensor] | None = None) -> Path | None:  # fmt: skip
        """Persist a finished block (``tensors``; None: a rank that writes no weights) and
        small ``side`` tensors a resumed run needs (:meth:`side`), then the next block's inputs
        (the folder ``hidden``, from :meth:`hidden_folder`, renamed into place), then the
        record; then forget inputs older than the ``keep`` latest. Returns where the inputs
        now lie."""
        start = time.perf_counter()
        if tensors is not None:
            with atomic_file(self._unit(index, "safetensors")) as tmp:
                self.bytes_written += write_file(tmp, tensors, {"unit": str(index)})
        if side is not None:
            with atomic_file(self._unit(index, "side.safetensors")) as tmp:
                save_file({k: v.contiguous() for k, v in side.items()}, str(tmp))
        if hidden is not None:
            final = self._hidden(index)
            shutil.rmtree(final, ignore_errors=True)  # left by a run killed before its record
            self.bytes_written += sum(p.stat().st_size for p in hidden.iterdir())
            hidden.rename(final)
        self.write_seconds += time.perf_counter() - start
        write_text_atomic(self._unit(index, "json"), json.dumps(record, default=str))
        kept = {self._hidden(index - k).name for k in range(self.keep)}
        for old in (self.path / "hidden").glob("after-*"):
            if old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)
        return self._hidden(index) if hidden is not None else None

    def side(self, index: int) -> dict[str, torch.Tensor] | None:
        """The ``side`` tensors written with unit ``index`` (None: none)."""
        path = self._unit(index, "side.safetensors")
        return load_file(str(path)) if path.is_file() else None

    def stored(self, name: str) -> dict[str, torch.Tensor] | None:
        """Tensors an earlier run kept under ``name`` (:meth:`store`); None: none."""
        path = self.path / f"{name}.safetensors"
        return load_file(str(path)) if path.is_file() else None

    def store(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep small tensors the whole run needs (a learned rotation) for a resumed run."""
        with atomic_file(self.path / f"{name}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    def hidden_folder(self, after: int) -> Path:
        """A fresh folder for the hidden states leaving block ``after`` while they are written
        (-1: those entering block 0)."""
        folder = self.path / "hidden" / f"after-{after:05d}.partial"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def hidden(self, after: int) -> Path | None:
        """The folder of the saved hidden states leaving block ``after`` (None: not saved)."""
        folder = self._hidden(after)
        return folder if folder.is_dir() else None

    def _hidden(self, after: int) -> Path:
        return self.path / "hidden" / f"after-{after:05d}"

    def units(self, count: int) -> list[dict[str, Entry]]:
        """The headers of units 0 .. count-1."""
        return [read_header(self._unit(i, "safetensors"))[0] for i in range(count)]

    def finish(self, units: int, overwrite: bool, extras: Callable[[Path], None]) -> Path:
        """Assemble the shards from ``units`` unit files and ``extras`` (config, tokenizer,
        manifest last) inside the work folder, publish it as ``out``, remove the work folder."""
        final = self.path / "final"
        shutil.rmtree(final, ignore_errors=True)
        final.mkdir()
        write_shards(final, self.units(units))
        extras(final)
        if self.out.exists() and not overwrite:
            raise LowbitError(f"{self.out} already exists; choose another --out or pass "
                              f"--overwrite")  # fmt: skip
        (self.path / PUBLISHED).write_text(str(self.out), encoding="utf-8")
        try:
            publish_dir(final, self.out, overwrite)
        except BaseException:
            (self.path / PUBLISHED).unlink(missing_ok=True)  # not published: resumable
            raise
        self.remove()
        return self.out

    def discard_if_unused(self) -> None:
        """Remove the folder of a run that failed before it finished a block (``started``: the
        runner began writing one) and keeps no tensors (a learned rotation): a recipe the model
        refuses leaves nothing a rerun could resume from, and that would refuse another
        recipe."""
        if not self.started and not self.records() and not any(self.path.glob("*.safetensors")):
            self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()
        if self.path.parent.name == "ranks":  # another rank's: its parents, once empty
            for folder in (self.path.parent, self.path.parent.parent):
                with contextlib.suppress(OSError):  # not empty: rank 0's, or another rank's
                    folder.rmdir()
