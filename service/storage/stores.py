"""Build the configured audio store: `file` (under the data dir) or `s3://bucket/prefix`."""

from __future__ import annotations

from service.config import Settings
from service.storage.audio import BlobStore


def open_audio_store(settings: Settings, url: str | None = None) -> BlobStore:
    """The store `url` names (default POSTCALL_AUDIO_STORE). Building it makes no network call."""
    url = settings.audio_store if url is None else url
    if url == "file":
        return BlobStore(settings.data_dir)
    from service.storage.s3 import S3Store, make_client
    from service.storage.s3_location import S3Location  # boto3 loads only when a bucket is used

    return S3Store(S3Location.parse(url), settings.data_dir, make_client(settings.s3_endpoint_url))
