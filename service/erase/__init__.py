"""Erasure for good: `DELETE /v1/conversations/{id}` and `postcall erase` — the batches and their tombstones
(`erasure`), the same conversations deleted at ElevenLabs (`upstream`), and the command around them (`command`).

A room of its own rather than beside record/purge.py: `--upstream` calls the ElevenLabs API, which the record room
must not depend on; what the record room does own is the rule every write obeys — a tombstoned conversation is
never written again (record/store.py)."""
