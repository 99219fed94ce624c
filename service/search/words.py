"""What a word is, and how a word is folded so that case and accents do not matter. Pure.

Documents, queries and snippets all go through these two functions, on both databases, so a conversation matches a
query on SQLite exactly when it does on PostgreSQL. Neither database's own word rules are used: PostgreSQL's parser
keeps `ada@example.com` or `www.example.com` as one token (a search for `example` would miss it), and SQLite's
`unicode61` tokenizer knows only Unicode 6.1's letters; both databases receive words already cut and folded
(search/index.py).

A word is a run of letters, digits and combining marks (`\\p{L}\\p{N}\\p{M}`): `e-mail` is `e` and `mail`, `3.14`
is `3` and `14`, `ada@example.com` is `ada`, `example` and `com`. Marks belong to the word they follow, so words of
scripts written with them (Devanagari, Thai…) stay whole. Text in scripts written without spaces (Chinese,
Japanese) is one word per run of characters: a part of such a run does not match.

Folding: compatibility decomposition (NFKD: `ﬁ` → `fi`, `²` → `2`), the accents on Latin, Greek and Cyrillic letters
removed (`é` → `e`, `ά` → `α`, `ё` → `е`; the marks of other scripts are part of their spelling and stay), Unicode
case folding (`Straße` → `strasse`, `ς` → `σ`), and the Latin letters that carry their stroke inside them and so have
no decomposition (`ø`, `æ`, `œ`, `ł`, `đ`, `ð`, `þ`, `ı`, `ħ`, `ŧ`) written as their plain letters. Words longer than
MAX_WORD_LENGTH characters after folding (a pasted token, base64) are not words anyone searches for: they are left
out of documents, and a query holding one matches nothing.
"""

# ruff: noqa: RUF001, RUF002 (this module is about letters that look alike)

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

import regex

MAX_WORD_LENGTH = 100

WORD = regex.compile(r"[\p{L}\p{N}\p{M}]+")
_ASCII_WORD = re.compile(r"[a-z0-9]+")  # WORD on folded ASCII text, where folding has left no upper case
_ACCENTS = regex.compile(r"([\p{Latin}\p{Greek}\p{Cyrillic}])\p{Mn}+")
_STROKED = str.maketrans(
    {"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i", "ħ": "h", "ŧ": "t"}
)


def fold(text: str) -> str:
    """`text` with case and accents folded away; only letters, digits and marks change (see the module's rules)."""
    if text.isascii():
        return text.lower()
    decomposed = _ACCENTS.sub(r"\1", unicodedata.normalize("NFKD", text))
    return unicodedata.normalize("NFC", decomposed.casefold().translate(_STROKED))


def distinct_words(text: str) -> list[str]:
    """The distinct folded words of `text`, in order of first appearance; words over MAX_WORD_LENGTH left out."""
    # One fold and one pass over the whole text, repeats dropped before anything is done per word: the write path
    # runs this for every new transcript.
    folded = fold(text)
    # ASCII text (most of it, in English) through the stdlib's engine, several times faster than regex's here.
    found = _ASCII_WORD.findall(folded) if folded.isascii() else WORD.findall(folded)
    distinct = list(dict.fromkeys(found))
    if distinct and max(map(len, distinct)) > MAX_WORD_LENGTH:
        return [word for word in distinct if len(word) <= MAX_WORD_LENGTH]
    return distinct


def spans(text: str) -> Iterator[tuple[int, int, list[str]]]:
    """Each word of `text` as (start, end, what it folds to): folding may split a word (`½` → `1⁄2` → `1`, `2`)."""
    for match in WORD.finditer(text):
        yield match.start(), match.end(), WORD.findall(fold(match.group()))
