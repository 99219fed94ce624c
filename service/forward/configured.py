"""The sinks the settings name: one per `POSTCALL_FORWARD_URLS` entry, and JetStream with a NATS URL."""

from __future__ import annotations

from service.config import Settings
from service.forward.sinks import Sink, sink_name


def sink_names(settings: Settings) -> list[str]:
    """The names (`GET /v1/forward`, metrics, `--sink`) of the configured sinks, in the settings' order."""
    names = [sink_name(url) for url in settings.forward_urls]
    if settings.forward_nats_url:
        names.append(sink_name(settings.forward_nats_url))
    return names


def build_sinks(settings: Settings) -> list[Sink]:
    """The configured sinks, ready to send (their connections open on first use)."""
    from service.forward.nats_sink import NatsSink
    from service.forward.signing import Signer
    from service.forward.webhook_sink import WebhookSink

    built: list[Sink] = []
    if settings.forward_urls:
        assert settings.forward_secret is not None  # the settings refuse URLs without it
        signer = Signer(settings.forward_secret.get_secret_value())
        built.extend(WebhookSink(url, signer) for url in settings.forward_urls)
    if settings.forward_nats_url:
        built.append(NatsSink(settings.forward_nats_url, settings.forward_nats_stream))
    return built
