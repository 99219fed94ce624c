"""The merge rules: how every source folds into the one record per conversation_id. Pure.

Each field declares its rule in record/fields.py (`Rule`); this module has one function per rule, so a new field
merges without an edit here.

- Rank. Each observation has one: status rank * 10 + source richness. The status rank follows the lifecycle
  (initiated 0, in-progress 1, processing 2, failed 3, done 4); the richness orders the sources (RICHNESS below).
- RANKED (what sources carry): an observation replaces these fields when its rank is at least the rank of the data
  already applied; otherwise it only fills fields that are still empty. A field a source does not carry (absent or
  None) is left as it is. So the transcription webhook or a detail fetch replaces a list summary, a webhook
  replaces a detail (never the reverse), and a stale summary arriving after them changes nothing.
- STATUS: the status with the higher rank wins, so a final status (failed, done) never goes back to initiated /
  in-progress / processing, and `done` outranks `failed`: a conversation ElevenLabs transcribed did take place.
- So a failure webhook never erases what a transcription or detail of a conversation that took place brought: after
  them it only fills what they left empty (its failure_reason), before them it is replaced by them, and the status
  stays `done`. Either order gives the same record. For a call that never connected, the failure webhook is the
  richest account there is: it outranks that call's summary and detail.
- KEYWISE: `labels` (given when a session is created) are merged key by key rather than replaced.
- Provenance: `first_seen_via` comes from the earliest observation; `webhook_received_at` and `audio_received_at`
  keep their earliest time, `reconciled_at` its latest.
- COMPLETE: the data applied is final and comes from a detail, a transcription webhook, or the failure webhook of a
  call that never connected (there is nothing more to fetch). An OTel transcription (`post_call_transcription_otel`)
  is not the JSON detail, so the reconciler still fetches that; nor is a list summary.
- REVISION counts committed changes, not observations: record/store.py asks `revised` once per transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from service.record.fields import FIELDS, Rule


class Source(StrEnum):
    SESSION = "session"
    LIST_SUMMARY = "list_summary"
    DETAIL = "detail"
    TRANSCRIPTION_WEBHOOK = "post_call_transcription"
    OTEL_WEBHOOK = "post_call_transcription_otel"
    FAILURE_WEBHOOK = "call_initiation_failure"
    AUDIO_WEBHOOK = "post_call_audio"
    AUDIO_FETCH = "audio_fetch"


CHANNEL: dict[Source, str] = {
    Source.SESSION: "session",
    Source.LIST_SUMMARY: "reconcile",
    Source.DETAIL: "reconcile",
    Source.AUDIO_FETCH: "reconcile",
    Source.TRANSCRIPTION_WEBHOOK: "webhook",
    Source.OTEL_WEBHOOK: "webhook",
    Source.FAILURE_WEBHOOK: "webhook",
    Source.AUDIO_WEBHOOK: "webhook",
}

# Distinct wherever two sources can describe one final conversation, so the record never depends on which was
# stored last. The webhook outranks the detail: delivered in order, a webhook makes the record complete and the
# reconciler never fetches the detail, so when a race brings both, the webhook's view is the one to keep. The same
# holds for the failure webhook of a call that never connected, which always says `failed`: delivered in order it
# completes the record. A transcription or detail saying `done` outranks it by status. OTel traces carry only the
# agent and the times here, less than a list summary.
RICHNESS: dict[Source, int] = {
    Source.SESSION: 0,
    Source.AUDIO_WEBHOOK: 0,
    Source.AUDIO_FETCH: 0,
    Source.OTEL_WEBHOOK: 1,
    Source.LIST_SUMMARY: 2,
    Source.DETAIL: 3,
    Source.FAILURE_WEBHOOK: 4,
    Source.TRANSCRIPTION_WEBHOOK: 5,
}
COMPLETE_RICHNESS = RICHNESS[Source.DETAIL]  # a detail, a failure or a transcription webhook tells it all

STATUS_RANK: dict[str, int] = {"initiated": 0, "in-progress": 1, "processing": 2, "failed": 3, "done": 4}
FINAL_STATUSES = frozenset({"done", "failed"})
FINAL_RANK = STATUS_RANK["failed"]  # the lowest final status rank
UNKNOWN_STATUS_RANK = -1
NO_DATA_RANK = UNKNOWN_STATUS_RANK * 10  # a new record's: every observation's rank is at least this

# The content a source may carry (record/fields.py); everything else on the record is provenance or audio bookkeeping.
CONTENT_FIELDS = tuple(entry.name for entry in FIELDS if entry.content)
# What a new value of is a content change, which adds one to `revision`.
REVISED_FIELDS = tuple(entry.name for entry in FIELDS if entry.revises)
_CONTENT = frozenset(CONTENT_FIELDS)


@dataclass(frozen=True)
class Audio:
    path: str
    size: int


@dataclass(frozen=True)
class Observation:
    """What one source says about one conversation at one moment."""

    conversation_id: str
    source: Source
    observed_at: datetime
    status: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, Any] | None = None
    audio: Audio | None = None

    @property
    def rank(self) -> int:
        return status_rank(self.status) * 10 + RICHNESS[self.source]


def status_rank(status: str | None) -> int:
    return STATUS_RANK.get(status or "", UNKNOWN_STATUS_RANK)


def is_final(status: str | None) -> bool:
    return status in FINAL_STATUSES


@dataclass(frozen=True)
class _Step:
    """One observation being applied, and the rank of the data the record held before it."""

    obs: Observation
    before: int

    @property
    def replaces(self) -> bool:
        return self.obs.rank >= self.before


def merge(record: Mapping[str, Any] | None, obs: Observation) -> dict[str, Any]:
    """The record after `obs` is applied to `record` (None: the conversation is new). Returns a new dict."""
    unknown = set(obs.fields) - _CONTENT
    if unknown:
        raise ValueError(f"unknown conversation field {sorted(unknown)[0]!r}")
    merged = dict(record) if record is not None else _new_record(obs)
    step = _Step(obs, merged["data_rank"])
    if step.replaces and obs.fields:
        merged["data_rank"] = obs.rank
    _ranked(merged, step)
    for apply, name in _OTHER_RULES:
        apply(merged, name, step)
    return merged


def revised(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> int:
    """`after`'s revision: 1 for a new record, one more than `before`'s when any revised field changed."""
    if before is None:
        return 1
    revision: int = before["revision"]
    changed = any(before.get(name) != after.get(name) for name in REVISED_FIELDS)
    return revision + 1 if changed else revision


def _new_record(obs: Observation) -> dict[str, Any]:
    record: dict[str, Any] = {entry.name: entry.default for entry in FIELDS}
    record.update(
        conversation_id=obs.conversation_id,
        first_seen_via=CHANNEL[obs.source],
        first_seen_at=obs.observed_at,
        audio_path=None,
        audio_bytes=None,
        data_rank=NO_DATA_RANK,
    )
    return record


def _ranked(merged: dict[str, Any], step: _Step) -> None:
    """RANKED: by what the observation carries, which is all a RANKED field can change (checked in `merge`)."""
    replaces = step.replaces
    for name, value in step.obs.fields.items():
        if value is not None and (replaces or merged.get(name) is None):
            merged[name] = value


def _status(merged: dict[str, Any], name: str, step: _Step) -> None:
    if step.obs.status is not None and status_rank(step.obs.status) > status_rank(merged.get(name)):
        merged[name] = step.obs.status


def _keywise(merged: dict[str, Any], name: str, step: _Step) -> None:
    if step.obs.labels:
        merged[name] = {**(merged.get(name) or {}), **step.obs.labels}


def _first_seen(merged: dict[str, Any], name: str, step: _Step) -> None:
    if step.obs.observed_at < merged["first_seen_at"]:
        merged["first_seen_at"] = step.obs.observed_at
        merged[name] = CHANNEL[step.obs.source]


def _webhook_time(merged: dict[str, Any], name: str, step: _Step) -> None:
    if CHANNEL[step.obs.source] == "webhook":
        merged[name] = _earliest(merged.get(name), step.obs.observed_at)


def _audio_time(merged: dict[str, Any], name: str, step: _Step) -> None:
    if step.obs.audio is not None:
        merged[name] = _earliest(merged.get(name), step.obs.observed_at)


def _reconcile_time(merged: dict[str, Any], name: str, step: _Step) -> None:
    if CHANNEL[step.obs.source] == "reconcile":
        merged[name] = _latest(merged.get(name), step.obs.observed_at)


def _audio_stored(merged: dict[str, Any], name: str, step: _Step) -> None:
    if step.obs.audio is not None:
        merged[name] = True
        merged["audio_path"] = step.obs.audio.path
        merged["audio_bytes"] = step.obs.audio.size


def _complete(merged: dict[str, Any], name: str, step: _Step) -> None:
    status, richness = divmod(merged["data_rank"], 10)
    merged[name] = status >= FINAL_RANK and richness >= COMPLETE_RICHNESS


_Apply = Callable[[dict[str, Any], str, _Step], None]
# Every rule but RANKED, applied field by field in the field list's order (COMPLETE after the data rank is set).
# IDENTITY is set with the record and REVISION counted per transaction (`revised`): nothing to do for them here.
_RULES: dict[Rule, _Apply | None] = {
    Rule.IDENTITY: None,
    Rule.RANKED: None,
    Rule.STATUS: _status,
    Rule.KEYWISE: _keywise,
    Rule.FIRST_SEEN: _first_seen,
    Rule.WEBHOOK_TIME: _webhook_time,
    Rule.AUDIO_TIME: _audio_time,
    Rule.RECONCILE_TIME: _reconcile_time,
    Rule.AUDIO_STORED: _audio_stored,
    Rule.COMPLETE: _complete,
    Rule.REVISION: None,
}
_OTHER_RULES: tuple[tuple[_Apply, str], ...] = tuple(
    (apply, entry.name) for entry in FIELDS if (apply := _RULES[entry.rule]) is not None
)


def _earliest(current: datetime | None, at: datetime) -> datetime:
    return at if current is None or at < current else current


def _latest(current: datetime | None, at: datetime) -> datetime:
    return at if current is None or at > current else current
