import bz2
from xml.sax.saxutils import escape

import pytest

from lowbit.data import load_corpus
from lowbit.data.wiki import clean_article, iter_pages
from lowbit.errors import LowbitError

ARTICLE = """'''Thing''' is a [[word|term]].<ref>A cite.</ref>
[[File:Pic.jpg|thumb|A caption]]
{{Infobox|name=Thing}}
==History==
It began.<ref name="x">Hidden</ref>
===Later===
More.
[[Category:Things]]
[[de:Ding]]
"""

DUMP = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Redirected</title><ns>0</ns><redirect title="X" />
  <revision><text>#REDIRECT [[X]]</text></revision></page>
<page><title>Talk:Thing</title><ns>1</ns><revision><text>chatter</text></revision></page>
<page><title>Thing</title><ns>0</ns><revision><text>{escape(ARTICLE)}</text></revision></page>
</mediawiki>"""


def test_wiki_pages_keep_articles_only():
    pages = list(iter_pages(bz2.compress(DUMP.encode())))
    assert [t for t, _ in pages] == ["Thing"]


def test_wiki_cleaning_is_wikitext_style():
    ((title, text),) = iter_pages(bz2.compress(DUMP.encode()))
    clean = clean_article(title, text)
    assert clean.splitlines() == [
        " = Thing = ",
        "Thing is a term.",
        " = = History = = ",
        "It began.",
        " = = = Later = = = ",
        "More.",
    ]


def test_local_text_file_is_a_corpus(text_file):
    corpus = load_corpus(str(text_file))
    assert corpus.text.startswith("the quick brown fox")
    assert len(corpus.sha256) == 64


def test_unknown_corpus_lists_the_names():
    with pytest.raises(LowbitError, match="wiki, bbc, shakespeare"):
        load_corpus("wikitext-9")


def test_hub_corpus_without_datasets_or_network_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(LowbitError, match=r"lowbit\[hub\]"):
        load_corpus("wikitext2")
