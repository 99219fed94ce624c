"""Where things are kept: tables, engines and transactions with their dialect details, migrations, audio files."""
