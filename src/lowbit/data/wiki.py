"""MediaWiki XML dump -> plain text articles, WikiText-style.

Keeps namespace-0 pages that are not redirects, strips markup with ``mwparserfromhell`` (the
field's wikitext parser), drops references, files, categories and interlanguage links, and writes
headings the way WikiText does (`` = = Section = = ``).
"""

from __future__ import annotations

import bz2
import contextlib
import io
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import mwparserfromhell as mwp

_DROP_TAGS = {"ref", "references", "gallery", "timeline", "math", "score", "imagemap", "source"}
_DROP_TAGS |= {"syntaxhighlight", "chem", "hiero", "graph", "templatedata"}
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


def iter_pages(xml_bz2: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the article pages (namespace 0, not redirects) of a bz2 XML dump."""
    with bz2.open(io.BytesIO(xml_bz2)) as f:
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = el.findtext("{*}ns")
            redirect = el.find("{*}redirect") is not None
            title = el.findtext("{*}title") or ""
            text = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns == "0" and not redirect and text.strip():
                yield title, text


def clean_article(title: str, wikitext: str) -> str:
    """Plain text of one article, starting with its `` = Title = `` line."""
    code = mwp.parse(wikitext)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).strip().lower() in _DROP_TAGS:
            _remove(code, tag)
    for link in code.filter_wikilinks(recursive=True):
        if _DROP_LINK.match(str(link.title)):
            _remove(code, link)
    for heading in code.filter_headings(recursive=True):
        bars = " ".join("=" * heading.level)
        text = heading.title.strip_code().strip()
        line = f"\n{bars} {text} {bars}\n" if text else "\n"
        _replace(code, heading, mwp.nodes.Text(line))  # a Text node: a str would be re-parsed
    body = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    lines = [_tidy(line) for line in body.split("\n")]
    lines = [f" {ln} " if ln.startswith("=") else ln for ln in lines if ln]
    return "\n".join([f" = {title} = ", *lines])


def _tidy(line: str) -> str:
    line = re.sub(r"[ \t]+", " ", line).strip()
    return "" if line in ("", "*", "#", ":", ";") else line


def _remove(code: mwp.wikicode.Wikicode, node: object) -> None:
    with contextlib.suppress(ValueError):  # already gone with an enclosing node
        code.remove(node)


def _replace(code: mwp.wikicode.Wikicode, node: object, text: str) -> None:
    with contextlib.suppress(ValueError):
        code.replace(node, text)
