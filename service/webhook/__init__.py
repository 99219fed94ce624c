"""`POST /webhooks/elevenlabs`: the signature, reading and pacing the body, the audio splitter, group commit."""
