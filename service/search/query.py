"""A user's `q` → the folded words every result must hold, and each database's query text for them. Pure.

The syntax is words: `q=refund invoice` finds conversations holding both words, anywhere, in any case, with or
without accents. Nothing else is syntax: quotes, `&`, `|`, `!`, `:`, `*`, `(`, `)`, `-`, `%`, `_`, `NEAR`, `AND`,
`OR` are either white space between words or a word like any other, so no query can reach either database as an
operator. A query with no word in it (only punctuation) matches nothing, and so does one holding a word longer
than any indexed word.

Each word reaches the database only inside quotes it cannot contain (a word is letters, digits and marks:
search/words.py), as FTS5 strings (`"refund" AND "invoice"`) or tsquery lexemes (`'refund' & 'invoice'`).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.search.words import MAX_WORD_LENGTH, WORD, fold

# Long enough for a sentence pasted from a transcript; a query's cost grows with its words, so they are bounded too.
MAX_QUERY_LENGTH = 500
MAX_QUERY_WORDS = 16


class SearchRefused(ValueError):
    """A query postcall will not run; the message says why, with the limit."""


@dataclass(frozen=True)
class Search:
    terms: tuple[str, ...]  # distinct folded words, in the order given

    @property
    def can_match(self) -> bool:
        return bool(self.terms) and all(len(term) <= MAX_WORD_LENGTH for term in self.terms)

    def fts5(self) -> str:
        """SQLite FTS5 MATCH text: every word, each a quoted string (its words are never split: index.py)."""
        return " AND ".join(f'"{term}"' for term in self.terms)

    def tsquery(self) -> str:
        """PostgreSQL tsquery text: every word, each a quoted lexeme, taken as it is (no parser, no dictionary)."""
        return " & ".join(f"'{term}'" for term in self.terms)


def parse(raw: str) -> Search:
    """The words of `raw`, folded; SearchRefused when it is longer than the limits."""
    if len(raw) > MAX_QUERY_LENGTH:
        raise SearchRefused(f"longer than {MAX_QUERY_LENGTH} characters")
    # The words of the whole folded text, exactly as a document's are cut (words.folded_words), but keeping the
    # long ones: a word the index leaves out must make the query match nothing, not be dropped from it.
    terms = tuple(dict.fromkeys(WORD.findall(fold(raw))))
    if len(terms) > MAX_QUERY_WORDS:
        raise SearchRefused(f"more than {MAX_QUERY_WORDS} different words")
    return Search(terms)
