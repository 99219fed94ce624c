"""Where a bucket store lives: `s3://bucket/prefix[?grace=SECONDS]`, parsed without loading any S3 client (the
settings check it at start)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

# How long a staged upload or a claim may wait for its record's commit before start-up takes it for a crash's
# leftover; the file store's STALE_TEMP_SECONDS.
DEFAULT_GRACE_SECONDS = 3600.0


class StoreURLError(ValueError):
    """`POSTCALL_AUDIO_STORE` is neither `file` nor a valid `s3://bucket/prefix`."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"
    grace_seconds: float = DEFAULT_GRACE_SECONDS

    @classmethod
    def parse(cls, url: str) -> S3Location:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreURLError(f"expected file or s3://bucket/prefix, got {url!r}")
        prefix = parts.path.strip("/")
        grace = parse_qs(parts.query).get("grace", [str(DEFAULT_GRACE_SECONDS)])[-1]
        try:
            grace_seconds = float(grace)
        except ValueError:
            raise StoreURLError(f"grace must be a number of seconds, got {grace!r}") from None
        if grace_seconds < 0:
            raise StoreURLError("grace must not be negative")
        return cls(parts.netloc, f"{prefix}/" if prefix else "", grace_seconds)

    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"
