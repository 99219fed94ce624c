"""Settings: read once from `POSTCALL_*` variables (and `.env`), then passed to whatever needs them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "POSTCALL_"

CommaList = Annotated[tuple[str, ...], NoDecode]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """Everything postcall can be told. Build it with `load_settings()`; never at import time."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    database_url: str = "sqlite:///./postcall.db"
    webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    webhook_tolerance_seconds: int = Field(default=1800, ge=0)
    max_body_bytes: int = Field(default=268_435_456, gt=0)
    # Disk that webhook bodies whose signature is not yet checked may hold together (see webhook/pending.py).
    max_pending_bytes: int = Field(default=536_870_912, gt=0)
    data_dir: Path = Path("./postcall-data")
    # `file` or s3://bucket/prefix; credentials and region of a bucket come from the standard AWS_* variables.
    audio_store: str = "file"
    s3_endpoint_url: str | None = None  # MinIO, R2, SeaweedFS…; None is AWS
    elevenlabs_api_key: SecretStr | None = None
    elevenlabs_base_url: str = "https://api.elevenlabs.io"
    agent_ids: CommaList = ()
    api_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Where ElevenLabs reaches this service (http or https, no trailing slash): `postcall doctor` checks that the
    # workspace's post-call webhook posts to its /webhooks/elevenlabs.
    public_url: str | None = None
    # Tokens that may also erase (api/auth.py): an admin token can do all a read token can.
    admin_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Forwarding (forward/): webhook endpoints that get every event, signed with forward_secret (Standard
    # Webhooks), and a NATS server with JetStream. forward_in_serve is `serve --no-forward`, passed to its workers.
    forward_urls: CommaList = ()
    forward_secret: SecretStr | None = Field(default=None, validate_default=True)
    forward_nats_url: str | None = None
    forward_nats_stream: str = "POSTCALL"
    events_retention: int = 30 * 86400  # seconds; given as a duration (30d, 12h…)
    forward_in_serve: bool = True

    @field_validator("agent_ids", "webhook_secrets", "api_tokens", "admin_tokens", "forward_urls", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("database_url", "elevenlabs_base_url")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("audio_store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        value = value.strip()
        if value != "file":
            from service.storage.s3_location import S3Location

            S3Location.parse(value)  # a StoreURLError is a ValueError: one line naming the variable
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _blank_endpoint_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be the http:// or https:// base URL of this service, e.g. https://calls.example.com")
        return url

    @field_validator("elevenlabs_api_key")
    @classmethod
    def _blank_key_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    @field_validator("forward_urls")
    @classmethod
    def _sink_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from service.forward.sinks import MAX_SINK_NAME, sink_name

        names: set[str] = set()
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{sink_name(url)!r} is not an http:// or https:// URL")
            if len(sink_name(url)) > MAX_SINK_NAME:
                raise ValueError(
                    f"{sink_name(url)[:60]}… is longer than {MAX_SINK_NAME} characters without credentials and query"
                )
            if sink_name(url) in names:
                raise ValueError(f"{sink_name(url)} is given twice (credentials and query left aside)")
            names.add(sink_name(url))
        return value

    @field_validator("forward_secret")
    @classmethod
    def _signing_secret(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            value = None
        if value is None:
            if info.data.get("forward_urls"):
                raise ValueError(f"is required with {env_name('forward_urls')}")
            return None
        from service.forward.signing import SigningSecretError, check_secret

        try:
            check_secret(value.get_secret_value())
        except SigningSecretError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("forward_nats_url")
    @classmethod
    def _nats_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ValueError("must be a nats:// (or tls://) URL, e.g. nats://127.0.0.1:4222")
        return value.strip()

    @field_validator("forward_nats_stream")
    @classmethod
    def _stream_name(cls, value: str) -> str:
        value = value.strip()
        if not value or any(char in value for char in " \t.*>/\\") or not value.isprintable():
            raise ValueError("must be a JetStream stream name: no spaces, '.', '*', '>', '/' or '\\'")
        return value

    @field_validator("events_retention", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            from service.reconcile.windows import WindowError, parse_duration

            try:
                seconds = parse_duration(value.strip())
            except WindowError as exc:
                raise ValueError(str(exc)) from None
            if seconds <= 0:
                raise ValueError("must be longer than 0")
            return seconds
        return value


class ConfigError(Exception):
    """A setting is missing or malformed; `str()` is one line naming the variable."""


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and `.env`) into Settings, turning validation errors into one ConfigError line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise ConfigError(f"{env_name(field)}: {first['msg']}") from None


def require(settings: Settings, field: str, purpose: str) -> None:
    """Stop with a ConfigError when a setting needed by `purpose` (a command) is empty."""
    if not getattr(settings, field):
        raise ConfigError(f"{env_name(field)} is required by {purpose} but is not set")
