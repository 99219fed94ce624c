"""Forwarding: every committed change of every conversation, at least once, to the team's systems.

`events` builds an event from a change (pure), `outbox` adds it in the change's own transaction, `feed` gives
events their commit order and reads them in it (`GET /v1/events`, and what the sinks are fed from).
"""
