"""The `postcall` command. Thin: parse arguments, load settings, call the modules that do the work."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, NoReturn

import typer

from service.config import ConfigError, Settings, load_settings, require

app = typer.Typer(
    name="postcall",
    help="Keep a complete record of ElevenLabs voice-agent conversations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on standard error, then exit: how every configuration or usage problem ends."""
    typer.echo(f"postcall: {message}", err=True)
    raise typer.Exit(code)


def settings_or_exit(*required: tuple[str, str]) -> Settings:
    """Load settings; a missing or malformed value exits 2 with one line naming the variable."""
    try:
        settings = load_settings()
        for field, purpose in required:
            require(settings, field, purpose)
    except ConfigError as exc:
        fail(str(exc))
    return settings


def setup_logging(level: int = logging.INFO) -> None:
    """JSON lines on standard error when it is not a terminal (see service/logs.py)."""
    from service.logs import configure

    configure(level, sys.stderr)


def _migrate(settings: Settings) -> None:
    from service.db import StoreUnavailable, create_engine
    from service.migrations import upgrade

    engine = create_engine(settings.database_url)
    try:
        upgrade(engine)
    except StoreUnavailable as exc:
        fail(f"cannot migrate {engine.url.render_as_string(hide_password=True)}: {exc}", code=1)
    finally:
        engine.dispose()


@app.command()
def migrate() -> None:
    """Upgrade the database to the newest migration."""
    setup_logging()
    _migrate(settings_or_exit())
    typer.echo("database is up to date", err=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", help="Do not migrate the database first.")] = False,
) -> None:
    """Migrate the database (unless --no-migrate) and serve the webhook receiver and the API."""
    import uvicorn

    from service.logs import dict_config

    setup_logging()
    settings = settings_or_exit(("webhook_secrets", "serve"))
    if not no_migrate:
        _migrate(settings)
    uvicorn.run(
        "service.web.asgi:build",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        log_config=dict_config(),  # structured logs in every worker process, uvicorn's lines included
        timeout_keep_alive=5,
        # A slow or stalled sender must not hold a worker: httptools' parser times out idle connections.
        h11_max_incomplete_event_size=64 * 1024,
    )


@app.command("send-test-webhook")
def send_test_webhook(
    url: Annotated[
        str, typer.Argument(help="The webhook URL to post to.")
    ] = "http://127.0.0.1:8000/webhooks/elevenlabs",
    type_: Annotated[
        str, typer.Option("--type", help="Which sample event: transcription, audio or failure.")
    ] = "transcription",
) -> None:
    """Sign a realistic sample event with the first configured secret, post it, and print the answer."""
    import time

    import httpx

    from service.samples import SampleType
    from service.send_test_webhook import TIMEOUT_SECONDS
    from service.send_test_webhook import send_test_webhook as send

    kinds = [kind.value for kind in SampleType]
    if type_ not in kinds:
        fail(f"--type must be one of {', '.join(kinds)}, not {type_!r}")
    settings = settings_or_exit(("webhook_secrets", "send-test-webhook"))
    secret = settings.webhook_secrets[0].get_secret_value().encode()
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS) as client:
            answer = send(client, url, SampleType(type_), secret, int(time.time()))
    except httpx.HTTPError as exc:
        fail(f"could not post to {url}: {type(exc).__name__}: {exc}", code=1)
    typer.echo(f"{answer.status_code} {answer.body}")
    if not answer.ok:
        fail(f"{url} answered {answer.status_code}, not 200 (sample conversation {answer.conversation_id})", code=1)
    typer.echo(f"sample conversation {answer.conversation_id} stored", err=True)


@app.command()
def purge(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of what to remove: 90d, 12w, 36h (by call start time).")
    ],
    audio_only: Annotated[bool, typer.Option("--audio-only", help="Delete only the audio; keep the records.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
) -> None:
    """Retention: delete conversations (or only their audio) that started before a cutoff, in batches."""
    import time

    from service import purge as retention
    from service.blobs import BlobStore
    from service.db import StoreUnavailable, create_engine
    from service.windows import WindowError, parse_duration

    try:
        age = parse_duration(older_than)
    except WindowError as exc:
        fail(f"--older-than: {exc}")
    if age <= 0:
        fail("--older-than must be longer than 0 (it would purge everything)")
    settings = settings_or_exit()
    setup_logging()
    cutoff = retention.Cutoff(int(time.time()) - age)
    engine = create_engine(settings.database_url)
    try:
        if dry_run:
            report = retention.count(engine, cutoff, audio_only)
        else:
            report = retention.purge(engine, BlobStore(settings.data_dir), cutoff, audio_only)
    except StoreUnavailable as exc:
        fail(f"database unavailable: {exc}", code=1)
    finally:
        engine.dispose()
    typer.echo(retention.describe(report, cutoff, older_than, audio_only, dry_run))


def main() -> None:
    app()
