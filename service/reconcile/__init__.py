"""`postcall reconcile`: windows and checkpoints, the run against the ElevenLabs API, and the command around it."""
