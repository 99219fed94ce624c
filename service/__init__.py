"""postcall: a complete record of ElevenLabs voice-agent conversations."""
