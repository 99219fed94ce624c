"""The conversation record: merge rules and ElevenLabs payloads read into observations (both pure), and the
one write path that stores them (`store`), with retention (`purge`)."""
