"""Turning stored values into page text: the Jinja environment and its filters. Pure.

Everything a template prints is autoescaped: transcripts, agent names, variables and analysis are whatever a caller
or ElevenLabs sent, and must show as text. The one filter that returns markup, `highlight`, escapes its input first
and only then turns the search's `«`/`»` markers into `<mark>` elements, so nothing of the snippet itself can become
markup.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

# One marked passage: the escaped text between a « and the next », neither of them inside.
_MARKED = re.compile("«([^«»]*)»")


def highlight(snippet: str | None) -> Markup:
    if not snippet:
        return Markup("")
    # Safe: every character of the snippet went through escape(); only our own <mark> tags are added.
    return Markup(_MARKED.sub(r"<mark>\1</mark>", str(escape(snippet))))  # noqa: S704


def utc_time(unix: int | float | None) -> str:
    if unix is None:
        return ""
    try:
        return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(unix)


def clock(seconds: Any) -> str:
    """A time in the call (or a duration) as m:ss, or h:mm:ss past an hour."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return ""
    whole = max(int(seconds), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def seconds(value: Any) -> float | None:
    """A turn's `time_in_call_secs` as a number the player can seek to; None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or value < 0:
        return None
    return float(value)


def pretty(value: Any) -> str:
    """JSON as a person reads it (autoescaped where it is printed)."""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def is_mapping(value: Any) -> bool:
    return isinstance(value, dict)


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("service.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(highlight=highlight, utc_time=utc_time, clock=clock, seconds=seconds, pretty=pretty)
    env.tests["mapping_value"] = is_mapping
    return env


def turns(transcript: Any) -> list[dict[str, Any]]:
    """The transcript's turns as the page shows them; a turn of an unexpected shape still shows, as JSON."""
    if not isinstance(transcript, list):
        return []
    shown: list[dict[str, Any]] = []
    for turn in transcript:
        if not isinstance(turn, dict):
            shown.append({"role": "", "message": pretty(turn), "at": None, "tool_calls": [], "tool_results": []})
            continue
        shown.append(
            {
                "role": str(turn.get("role") or ""),
                "message": turn.get("message") if isinstance(turn.get("message"), str) else None,
                "at": seconds(turn.get("time_in_call_secs")),
                "tool_calls": _list(turn.get("tool_calls")),
                "tool_results": _list(turn.get("tool_results")),
            }
        )
    return shown


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def analysis_rows(analysis: Any, key: str, value_key: str) -> list[tuple[str, Any, Any]]:
    """(name, result or value, rationale) for each entry of `analysis[key]` (evaluation criteria or data
    collection results, which ElevenLabs keys by their id)."""
    entries = analysis.get(key) if isinstance(analysis, dict) else None
    if not isinstance(entries, dict):
        return []
    rows = []
    for name, entry in entries.items():
        if isinstance(entry, dict):
            rows.append((str(name), entry.get(value_key), entry.get("rationale")))
        else:
            rows.append((str(name), entry, None))
    return rows
