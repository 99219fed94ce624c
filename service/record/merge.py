"""The merge rules: how every source folds into the one record per conversation_id. Pure.

- A final status (`done`, `failed`) never goes back to `initiated` / `in-progress` / `processing`: the status with
  the higher rank always wins, so the order in which sources arrive does not matter.
- A field a source does not carry (absent or None) is left as it is.
- Each observation has a rank: (status rank, source richness). Its fields replace the record's when its rank is
  at least the rank of the data already applied; otherwise it only fills fields that are still empty. So the
  transcription webhook or a detail fetch replaces a list summary, a webhook replaces a detail (never the
  reverse), and a stale summary arriving after them changes nothing.
- `labels` (given when a session is created) are merged key by key rather than replaced.
- Provenance: `first_seen_via` comes from the earliest observation; `webhook_received_at` and
  `audio_received_at` keep their earliest time, `reconciled_at` its latest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from service.record.fields import FIELDS


class Source(StrEnum):
    SESSION = "session"
    LIST_SUMMARY = "list_summary"
    DETAIL = "detail"
    TRANSCRIPTION_WEBHOOK = "post_call_transcription"
    FAILURE_WEBHOOK = "call_initiation_failure"
    AUDIO_WEBHOOK = "post_call_audio"
    AUDIO_FETCH = "audio_fetch"


CHANNEL: dict[Source, str] = {
    Source.SESSION: "session",
    Source.LIST_SUMMARY: "reconcile",
    Source.DETAIL: "reconcile",
    Source.AUDIO_FETCH: "reconcile",
    Source.TRANSCRIPTION_WEBHOOK: "webhook",
    Source.FAILURE_WEBHOOK: "webhook",
    Source.AUDIO_WEBHOOK: "webhook",
}

# Distinct wherever two sources can describe one final conversation, so the record never depends on which was
# stored last. The webhook outranks the detail: delivered in order, a webhook makes the record complete and the
# reconciler never fetches the detail, so when a race brings both, the webhook's view is the one to keep.
RICHNESS: dict[Source, int] = {
    Source.SESSION: 0,
    Source.AUDIO_WEBHOOK: 0,
    Source.AUDIO_FETCH: 0,
    Source.LIST_SUMMARY: 1,
    Source.DETAIL: 2,
    Source.TRANSCRIPTION_WEBHOOK: 3,
    Source.FAILURE_WEBHOOK: 3,
}
COMPLETE_RICHNESS = RICHNESS[Source.DETAIL]  # a detail or a transcription webhook holds the whole conversation

STATUS_RANK: dict[str, int] = {"initiated": 0, "in-progress": 1, "processing": 2, "done": 3, "failed": 4}
FINAL_STATUSES = frozenset({"done", "failed"})
UNKNOWN_STATUS_RANK = -1

# The content a source may carry (record/fields.py); everything else on the record is provenance or audio bookkeeping.
CONTENT_FIELDS = tuple(entry.name for entry in FIELDS if entry.content)


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


def merge(record: Mapping[str, Any] | None, obs: Observation) -> dict[str, Any]:
    """The record after `obs` is applied to `record` (None: the conversation is new). Returns a new dict."""
    merged = dict(record) if record is not None else _new_record(obs)
    _merge_status(merged, obs)
    _merge_content(merged, obs)
    _merge_provenance(merged, obs)
    if obs.audio is not None:
        merged["has_audio"] = True
        merged["audio_path"] = obs.audio.path
        merged["audio_bytes"] = obs.audio.size
    merged["complete"] = merged["data_rank"] >= STATUS_RANK["done"] * 10 + COMPLETE_RICHNESS
    return merged


def _new_record(obs: Observation) -> dict[str, Any]:
    record: dict[str, Any] = {entry.name: entry.default for entry in FIELDS}
    record.update(
        conversation_id=obs.conversation_id,
        first_seen_via=CHANNEL[obs.source],
        first_seen_at=obs.observed_at,
        audio_path=None,
        audio_bytes=None,
        data_rank=UNKNOWN_STATUS_RANK * 10,
    )
    return record


def _merge_status(merged: dict[str, Any], obs: Observation) -> None:
    if obs.status is not None and status_rank(obs.status) > status_rank(merged.get("status")):
        merged["status"] = obs.status


def _merge_content(merged: dict[str, Any], obs: Observation) -> None:
    replaces = obs.rank >= merged["data_rank"]
    for name, value in obs.fields.items():
        if name not in CONTENT_FIELDS:
            raise ValueError(f"unknown conversation field {name!r}")
        if value is not None and (replaces or merged.get(name) is None):
            merged[name] = value
    if replaces and obs.fields:
        merged["data_rank"] = obs.rank
    if obs.labels:
        merged["labels"] = {**(merged.get("labels") or {}), **obs.labels}


def _merge_provenance(merged: dict[str, Any], obs: Observation) -> None:
    at = obs.observed_at
    if at < merged["first_seen_at"]:
        merged["first_seen_at"] = at
        merged["first_seen_via"] = CHANNEL[obs.source]
    channel = CHANNEL[obs.source]
    if channel == "webhook":
        merged["webhook_received_at"] = _earliest(merged.get("webhook_received_at"), at)
    elif channel == "reconcile":
        merged["reconciled_at"] = _latest(merged.get("reconciled_at"), at)
    if obs.audio is not None:
        merged["audio_received_at"] = _earliest(merged.get("audio_received_at"), at)


def _earliest(current: datetime | None, at: datetime) -> datetime:
    return at if current is None or at < current else current


def _latest(current: datetime | None, at: datetime) -> datetime:
    return at if current is None or at > current else current
