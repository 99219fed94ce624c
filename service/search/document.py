"""A conversation's searchable text: the words it is found by, and the snippet that shows why it matched. Pure.

What is searched: the transcript's messages (`transcript[].message`; tool calls and their results are not what a
caller said), `transcript_summary` and `call_summary_title`. The same record gives the same words on either
database, because the words are cut and folded here (search/words.py) and the databases only store them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import regex

from service.search.words import distinct_words, fold, spans

# The record's fields a document is made of: a write that changes none of them leaves the search entry as it is.
SOURCE_FIELDS = ("call_summary_title", "transcript_summary", "transcript")
# Distinct words kept per conversation, in the order of `passages` (title and summary first, so a transcript of
# hours cannot push them out). A 20-turn call has a few hundred; the bound keeps PostgreSQL's tsvector (at most
# 1 MB) and any one write small whatever a webhook carries.
MAX_DOCUMENT_WORDS = 20_000
SNIPPET_CHARACTERS = 200
OPEN, CLOSE = "«", "»"
ELLIPSIS = "…"
_SPACE = regex.compile(r"\s+")


def passages(record: Mapping[Any, Any]) -> list[str]:
    """The record's searchable texts: title, summary, then each transcript message."""
    heading, messages = _heading_and_messages(record)
    return heading + messages


def _heading_and_messages(record: Mapping[Any, Any]) -> tuple[list[str], list[str]]:
    heading = [record.get("call_summary_title"), record.get("transcript_summary")]
    transcript = record.get("transcript")
    turns = transcript if isinstance(transcript, list) else []
    messages = [turn.get("message") for turn in turns if isinstance(turn, dict)]
    return [text for text in heading if isinstance(text, str)], [text for text in messages if isinstance(text, str)]


def document(record: Mapping[Any, Any]) -> list[str]:
    """The distinct folded words a conversation is found by; empty when it has no searchable text."""
    # One string, so the words are cut in one pass; a line break ends a word like any other separator.
    return distinct_words("\n".join(passages(record)))[:MAX_DOCUMENT_WORDS]


def same_text(before: Mapping[Any, Any] | None, after: Mapping[Any, Any]) -> bool:
    """Whether two versions of a record have the same searchable fields (then their documents are equal)."""
    return before is not None and all(before.get(name) == after.get(name) for name in SOURCE_FIELDS)


@dataclass(frozen=True)
class _Candidate:
    text: str
    matches: list[tuple[int, int, str]]  # (start, end, the query word it matched) in text order

    @property
    def score(self) -> tuple[int, int]:
        return len({word for _, _, word in self.matches}), len(self.matches)


def snippet(record: Mapping[Any, Any], terms: Collection[str], width: int = SNIPPET_CHARACTERS) -> str | None:
    """The best matching passage, cut to about `width` characters around its matches, each match between « ».

    Best: the passage holding the most distinct query words, then the most matches; on a tie a transcript message
    before the summary and the summary before the title (what was said is what a person scanning results wants to
    read), an earlier message before a later one. A passage's own « and » are left as they are. None when no
    passage holds a query word, which a record the search found always does.
    """
    heading, messages = _heading_and_messages(record)
    best: _Candidate | None = None
    for text in [_SPACE.sub(" ", text).strip() for text in [*messages, *heading[::-1]]]:
        candidate = _Candidate(text, _matches(text, terms))
        if candidate.matches and (best is None or candidate.score > best.score):
            best = candidate
    return None if best is None else _excerpt(best, width)


def _matches(text: str, terms: Collection[str]) -> list[tuple[int, int, str]]:
    folded_text = fold(text)
    if not any(term in folded_text for term in terms):
        return []  # most passages hold no query word even as a substring: spared the word-by-word pass below
    found = []
    for start, end, folded in spans(text):
        hit = next((word for word in folded if word in terms), None)
        if hit is not None:
            found.append((start, end, hit))
    return found


def _excerpt(candidate: _Candidate, width: int) -> str:
    text, matches = candidate.text, candidate.matches
    start, end = _window(text, matches, width)
    shown = [match for match in matches if start <= match[0] and match[1] <= end]
    pieces, at = [], start
    for match_start, match_end, _ in shown:
        pieces += [text[at:match_start], OPEN, text[match_start:match_end], CLOSE]
        at = match_end
    pieces.append(text[at:end])
    prefix = ELLIPSIS if start > 0 else ""
    suffix = ELLIPSIS if end < len(text) else ""
    return prefix + "".join(pieces).strip() + suffix


def _window(text: str, matches: Sequence[tuple[int, int, str]], width: int) -> tuple[int, int]:
    """[start, end) of at most about `width` characters holding the most distinct matched words, cut at spaces."""
    if len(text) <= width:
        return 0, len(text)
    lead = width // 4  # some words before the first match, so it reads as a passage
    best_start, best_score = 0, -1
    for first, _, _ in matches:
        start = max(0, first - lead)
        inside = [match for match in matches if start <= match[0] and match[1] <= start + width]
        score = len({word for _, _, word in inside})
        if score > best_score:
            best_start, best_score = start, score
    end = min(len(text), best_start + width)
    first_match = min((match[0] for match in matches if match[0] >= best_start), default=best_start)
    if best_start > 0:  # begin at a word, never mid-word
        space = text.find(" ", best_start, first_match)
        best_start = space + 1 if space >= 0 else best_start
    if end < len(text):
        last_match_end = max((m[1] for m in matches if best_start <= m[0] and m[1] <= end), default=best_start)
        space = text.rfind(" ", last_match_end, end)
        end = space if space >= 0 else end
    return best_start, end
