"""The `postcall` command. Thin: parse arguments, load settings, call the modules that do the work."""

from __future__ import annotations

import logging
import sys
from typing import Annotated, NoReturn

import typer

from service.config import ConfigError, Settings, env_name, load_settings, require

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
    from service.storage.db import StoreUnavailable, create_engine
    from service.storage.migrations import upgrade

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


def _share_pending_budget(settings: Settings, workers: int) -> None:
    """Each worker process keeps its own budget for unverified bodies: give each its share of the setting, so that
    together they stay within it, and say so when a share cannot take the largest body allowed."""
    import os

    share = settings.max_pending_bytes // workers
    if workers > 1:
        os.environ[env_name("max_pending_bytes")] = str(share)  # read by each worker's settings
    if share < settings.max_body_bytes:
        logging.getLogger("postcall.server").warning(
            "each of %d workers may hold %d bytes of unverified bodies, less than the largest body allowed (%d): "
            "a body larger than that is always answered 503; raise %s",
            workers,
            share,
            settings.max_body_bytes,
            env_name("max_pending_bytes"),
        )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    no_migrate: Annotated[bool, typer.Option("--no-migrate", help="Do not migrate the database first.")] = False,
    no_forward: Annotated[
        bool, typer.Option("--no-forward", help="Do not forward events here (a `postcall forward` process does).")
    ] = False,
    limit_concurrency: Annotated[
        int, typer.Option(min=1, help="Connections a worker keeps at once, idle ones included; past it, 503.")
    ] = 2048,  # ElevenLabs sends tens at once; 1,100 connections stuck in their heads still leave room
) -> None:
    """Migrate the database (unless --no-migrate) and serve the webhook receiver and the API."""
    import uvicorn

    from service.logs import dict_config
    from service.web import server

    setup_logging()
    settings = settings_or_exit(("webhook_secrets", "serve"))
    if not no_migrate:
        _migrate(settings)
    _share_pending_budget(settings, workers)
    if no_forward:
        import os

        os.environ[env_name("forward_in_serve")] = "false"  # read by each worker's settings
    logging.getLogger("postcall.server").info("open files limit: %d", server.raise_open_files_limit())
    uvicorn.run(
        "service.web.asgi:build",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        log_config=dict_config(),  # structured logs in every worker process, uvicorn's lines included
        http=server.HeadLimitedProtocol,  # a head must come whole, soon and small (see service/web/server.py)
        ws="none",  # no route speaks WebSocket: an upgrade is refused rather than handed to a library
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=server.KEEP_ALIVE_SECONDS,
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

    from service.testing.samples import SampleType
    from service.webhook.send_test import TIMEOUT_SECONDS
    from service.webhook.send_test import send_test_webhook as send

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

    from service.reconcile.windows import WindowError, parse_duration
    from service.record import purge as retention
    from service.storage.db import StoreUnavailable, create_engine
    from service.storage.stores import open_audio_store

    try:
        age = parse_duration(older_than)
    except WindowError as exc:
        fail(f"--older-than: {exc}")
    if age <= 0:
        fail("--older-than must be longer than 0 (it would purge everything)")
    settings = settings_or_exit()
    setup_logging()
    try:
        cutoff = retention.Cutoff(int(time.time()) - age)
    except retention.CutoffError as exc:
        fail(f"--older-than {older_than}: {exc}")
    engine = create_engine(settings.database_url)
    try:
        if dry_run:
            report = retention.count(engine, cutoff, audio_only)
        else:
            report = retention.purge(engine, open_audio_store(settings), cutoff, audio_only)
    except StoreUnavailable as exc:
        fail(f"database unavailable: {exc}", code=1)
    finally:
        engine.dispose()
    typer.echo(retention.describe(report, cutoff, older_than, audio_only, dry_run))


MAX_USER_ID_LENGTH = 1024  # the user_id column's width


@app.command()
def erase(
    conversation: Annotated[
        list[str] | None, typer.Option("--conversation", help="A conversation id to erase (repeatable).")
    ] = None,
    user_id: Annotated[str | None, typer.Option("--user-id", help="Erase every conversation of this user_id.")] = None,
    upstream: Annotated[
        bool, typer.Option("--upstream", help="Also delete them at ElevenLabs (needs POSTCALL_ELEVENLABS_API_KEY).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be erased.")] = False,
) -> None:
    """Erase conversations for good: record, audio, archived webhook bodies; a tombstone keeps them from coming back."""
    from service.erase.command import execute
    from service.record.payloads import valid_conversation_id

    ids = conversation or []
    if bool(ids) == (user_id is not None):
        fail("give either --conversation ID (repeatable) or --user-id U")
    for conversation_id in ids:
        if not valid_conversation_id(conversation_id):
            fail(f"--conversation {conversation_id!r} is not a conversation id")
    if user_id is not None and not (0 < len(user_id) <= MAX_USER_ID_LENGTH and "\x00" not in user_id):
        fail(f"--user-id must be 1 to {MAX_USER_ID_LENGTH} characters, without NUL")
    required = [("elevenlabs_api_key", "erase --upstream")] if upstream and not dry_run else []
    settings = settings_or_exit(*required)
    setup_logging()
    code = execute(settings, conversation_ids=ids, user_id=user_id, upstream=upstream, dry_run=dry_run)
    raise typer.Exit(code)


@app.command()
def reconcile(
    agent: Annotated[
        list[str] | None, typer.Option("--agent", help="Agent id (repeatable); default POSTCALL_AGENT_IDS, else all.")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Window start: 7d, ISO-8601 or unix seconds (overrides the checkpoint).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Window end (exclusive): same forms; default now.")] = None,
    audio: Annotated[bool, typer.Option("--audio", help="Also fetch the audio of conversations that have it.")] = False,
    no_details: Annotated[bool, typer.Option("--no-details", help="Store list summaries only.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List and count; write nothing.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")] = False,
) -> None:
    """Backfill every conversation the webhooks missed: exit 0 all stored, 1 something failed, 3 lease held."""
    import time

    from service.reconcile.command import execute
    from service.reconcile.reconciler import Options
    from service.reconcile.windows import WindowError, check_bounds, parse_instant

    now = int(time.time())
    start = end = None
    for name, text in (("since", since), ("until", until)):
        try:
            value = parse_instant(text, now) if text is not None else None
        except WindowError as exc:
            fail(f"--{name}: {exc}")
        start, end = (value, end) if name == "since" else (start, value)
    try:
        check_bounds(start, end, now)
    except WindowError as exc:
        fail(str(exc))
    settings = settings_or_exit(("elevenlabs_api_key", "reconcile"))
    setup_logging()
    options = Options(
        agents=tuple(agent or ()), since=start, until=end, audio=audio, details=not no_details, dry_run=dry_run
    )
    raise typer.Exit(execute(settings, options, as_json=json_output))


@app.command()
def export(
    since: Annotated[
        str | None, typer.Option(help="Start time from (inclusive): 7d, ISO-8601 or unix seconds.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Start time before (exclusive): same forms.")] = None,
    agent: Annotated[
        list[str] | None, typer.Option("--agent", help="Agent id (repeatable); default every agent.")
    ] = None,
    format_: Annotated[
        str | None, typer.Option("--format", help="jsonl, csv or parquet; default from --output's suffix, else jsonl.")
    ] = None,
    output: Annotated[str | None, typer.Option(help="File to write; - or none is standard output.")] = None,
) -> None:
    """Write every matching conversation, oldest start first, as JSON lines, CSV or Parquet."""
    import os
    import time

    from service.export.command import Destination, ExportUsageError, execute, parse_selection
    from service.export.formats import FormatError, choose_format
    from service.storage.db import StoreUnavailable

    try:
        selection = parse_selection(since, until, agent or (), int(time.time()))
        fmt = choose_format(format_, output)
        destination = Destination.of(output)
    except (ExportUsageError, FormatError) as exc:
        fail(str(exc))
    settings = settings_or_exit()
    setup_logging()
    try:
        written = execute(settings.database_url, selection, fmt, destination)
    except StoreUnavailable as exc:
        fail(f"database unavailable: {exc}", code=1)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining as it flushes stdout.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(1) from None
    except OSError as exc:
        fail(f"cannot write {destination.describe()}: {exc.strerror or exc}", code=1)
    typer.echo(f"exported {written} conversation(s) as {fmt.value} to {destination.describe()}", err=True)


audio_app = typer.Typer(help="Move stored audio between stores.", no_args_is_help=True)
app.add_typer(audio_app, name="audio")


@audio_app.command("copy")
def audio_copy(
    to: Annotated[str, typer.Option("--to", help="The target bucket: s3://bucket/prefix.")],
) -> None:
    """Copy every stored audio file to a bucket: verified (size and SHA-256), resumable, skipping what is there."""
    from rich.progress import Progress

    from service.storage.copy import CopyMismatch, copy_audio, count_audio
    from service.storage.s3 import S3Store
    from service.storage.s3_location import StoreURLError
    from service.storage.stores import open_audio_store

    settings = settings_or_exit()
    setup_logging()
    try:
        target = open_audio_store(settings, to)
    except StoreURLError as exc:
        fail(f"--to: {exc}")
    if not isinstance(target, S3Store):
        fail("--to: expected s3://bucket/prefix")
    source = open_audio_store(settings)
    try:
        with Progress(disable=not sys.stderr.isatty(), transient=True) as progress:
            task = progress.add_task("copying audio", total=count_audio(source))
            report = copy_audio(source, target, lambda relpath: progress.advance(task))
    except CopyMismatch as exc:
        fail(str(exc), code=1)
    except OSError as exc:
        fail(f"copy stopped (run it again to resume): {exc.strerror or exc}", code=1)
    typer.echo(
        f"copied {report.copied} audio file(s) ({report.bytes_copied:,} bytes) to {target.describe()}; "
        f"{report.skipped} already there",
        err=True,
    )


forward_app = typer.Typer(
    help="Forward every event to the configured sinks (webhooks, NATS JetStream); `replay` sends some again.",
    invoke_without_command=True,
)
app.add_typer(forward_app, name="forward")


@forward_app.callback()
def forward(
    ctx: typer.Context,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve this process's Prometheus metrics on 127.0.0.1:PORT.")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Interface for --metrics-port.")] = "127.0.0.1",
) -> None:
    """Dispatch events to every configured sink until stopped (beside `serve --no-forward`, or alone)."""
    if ctx.invoked_subcommand is not None:
        return
    from prometheus_client import start_http_server

    from service.forward.command import run_dispatcher
    from service.forward.configured import sink_names
    from service.storage.db import create_engine
    from service.web.metrics import Metrics

    settings = settings_or_exit()
    if not sink_names(settings):
        fail(
            f"no sink configured: set {env_name('forward_urls')} (with {env_name('forward_secret')}) "
            f"or {env_name('forward_nats_url')}"
        )
    setup_logging()
    engine = create_engine(settings.database_url)
    metrics = Metrics(engine=lambda: engine, forward_sinks=lambda: sink_names(settings))
    if metrics_port is not None:
        start_http_server(metrics_port, metrics_host, registry=metrics.registry)
    try:
        code = run_dispatcher(settings, engine, metrics.forward)
    finally:
        engine.dispose()
    raise typer.Exit(code)


@forward_app.command("replay")
def forward_replay(
    since: Annotated[str, typer.Option(help="Send again the events committed since: 7d, ISO-8601 or unix seconds.")],
    sink: Annotated[str | None, typer.Option(help="Only to this sink (its name as GET /v1/forward shows it).")] = None,
) -> None:
    """Send the events committed since a moment again, with their ids, to every sink or the one named."""
    from datetime import UTC, datetime

    from service.forward.configured import sink_names
    from service.forward.replay import ReplayError, choose_sinks, parse_since, replay
    from service.storage.db import StoreUnavailable, create_engine

    settings = settings_or_exit()
    now = datetime.now(UTC)
    try:
        moment = parse_since(since, now)
        names = choose_sinks(sink_names(settings), sink)
    except ReplayError as exc:
        fail(f"--{exc.field}: {exc}")
    setup_logging()
    engine = create_engine(settings.database_url)
    try:
        count = replay(engine, names, moment, now)
    except StoreUnavailable as exc:
        fail(f"database unavailable: {exc}", code=1)
    finally:
        engine.dispose()
    typer.echo(
        f"{count} deliveries of events since {moment.isoformat()} pending again for {', '.join(names)}", err=True
    )


@app.command()
def doctor() -> None:
    """Check the deployment end to end, one line per check: exit 0 when none fails (warnings allowed), 1 otherwise."""
    from service.doctor.command import execute

    settings = settings_or_exit()
    setup_logging(logging.WARNING)  # the client's retries, if any; the checks' own lines go to standard output
    logging.getLogger("httpx").setLevel(logging.WARNING)
    raise typer.Exit(execute(settings))


@app.command()
def simulate(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port of the fake API.")] = 8700,
    conversations: Annotated[int, typer.Option(min=0, help="Conversations in the data set.")] = 200,
    agents: Annotated[int, typer.Option(min=1, help="Agents they belong to.")] = 2,
    days: Annotated[int, typer.Option(min=1, help="Start times spread over this many days back.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the data set and of the webhook faults.")] = 1,
    api_key: Annotated[str, typer.Option(help="The xi-api-key the fake accepts.")] = "sim-api-key",
    latency: Annotated[float, typer.Option(min=0, help="Seconds added to every answer.")] = 0.0,
    webhook_url: Annotated[
        str | None, typer.Option(help="Post the conversations' signed webhooks here (a postcall receiver).")
    ] = None,
    drop: Annotated[float, typer.Option(min=0, max=1, help="Share of webhooks never sent.")] = 0.3,
    duplicate: Annotated[float, typer.Option(min=0, max=1, help="Share sent twice.")] = 0.1,
    reorder: Annotated[float, typer.Option(min=0, max=1, help="Share swapped with a neighbour.")] = 0.2,
    audio_webhooks: Annotated[bool, typer.Option("--audio-webhooks", help="Send audio webhooks too.")] = False,
) -> None:
    """Run a fake ElevenLabs API with a seeded data set, to try postcall end to end without an account."""
    from service.testing.simulate import Faults, Simulation, run

    secret = None
    if webhook_url is not None:
        settings = settings_or_exit(("webhook_secrets", "simulate --webhook-url"))
        secret = settings.webhook_secrets[0].get_secret_value()
    simulation = Simulation(
        host=host,
        port=port,
        conversations=conversations,
        agents=agents,
        days=days,
        seed=seed,
        api_key=api_key,
        latency=latency,
        webhook_url=webhook_url,
        webhook_secret=secret,
        faults=Faults(drop=drop, duplicate=duplicate, reorder=reorder, seed=seed),
        audio_webhooks=audio_webhooks,
    )
    run(simulation, lambda line: typer.echo(line, err=True))


def main() -> None:
    app()
