"""GET /v1/conversations/{id}/audio: the stored MP3, whole or one byte range."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from service.api.routes import ByteRange, RangeNotSatisfiable, requested_range
from service.config import Settings
from service.web.app import create_app
from tests.support import records

AUTH = {"Authorization": "Bearer test-token"}
AUDIO = bytes(range(256)) * 1000  # 256,000 bytes: several streamed chunks
URL = "/v1/conversations/conv_audio/audio"


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    records.store(
        engine,
        [
            records.detail("conv_audio"),
            records.audio("conv_audio", settings.data_dir, AUDIO),
            records.detail("conv_mute"),
        ],
    )
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def test_the_whole_file_without_range(client: TestClient) -> None:
    answer = client.get(URL, headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "audio/mpeg"
    assert answer.headers["accept-ranges"] == "bytes"
    assert answer.headers["content-length"] == str(len(AUDIO))
    assert answer.content == AUDIO


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, len(AUDIO) - 1),  # open-ended
        ("bytes=-500", len(AUDIO) - 500, len(AUDIO) - 1),  # suffix
        ("bytes=-999999999", 0, len(AUDIO) - 1),  # a suffix longer than the file is the whole file
        ("bytes=255990-999999999", 255_990, len(AUDIO) - 1),  # an end past the end is clipped
        ("bytes=65530-65545", 65_530, 65_545),  # across a chunk boundary
        (" BYTES = 7 - 9 ", 7, 9),
    ],
)
def test_one_range_is_206(client: TestClient, header: str, start: int, end: int) -> None:
    answer = client.get(URL, headers={**AUTH, "Range": header})
    assert answer.status_code == 206
    assert answer.headers["content-range"] == f"bytes {start}-{end}/{len(AUDIO)}"
    assert answer.headers["content-length"] == str(end - start + 1)
    assert answer.content == AUDIO[start : end + 1]


@pytest.mark.parametrize("header", ["bytes=256000-", "bytes=300000-300010", "bytes=-0"])
def test_a_range_beyond_the_end_is_416(client: TestClient, header: str) -> None:
    answer = client.get(URL, headers={**AUTH, "Range": header})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == f"bytes */{len(AUDIO)}"
    assert answer.json() == {"error": "range not satisfiable"}


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,5-6",  # several ranges: the documented choice is the whole file
        "bytes=9-3",  # last before first: invalid, ignored
        "items=0-5",
        "bytes=abc",
        "bytes=",
        "bytes=-",
    ],
)
def test_ranges_we_do_not_serve_get_the_whole_file(client: TestClient, header: str) -> None:
    answer = client.get(URL, headers={**AUTH, "Range": header})
    assert answer.status_code == 200
    assert answer.content == AUDIO


def test_if_range_is_answered_with_the_whole_file(client: TestClient) -> None:
    answer = client.get(URL, headers={**AUTH, "Range": "bytes=0-0", "If-Range": '"some-etag"'})
    assert answer.status_code == 200
    assert len(answer.content) == len(AUDIO)


def test_no_audio_is_404(client: TestClient) -> None:
    for url in ("/v1/conversations/conv_mute/audio", "/v1/conversations/conv_nobody/audio"):
        answer = client.get(url, headers=AUTH)
        assert answer.status_code == 404
        assert answer.json() == {"error": "no audio stored for this conversation"}


def test_a_file_missing_from_the_blob_store_is_404_not_500(client: TestClient, settings: Settings) -> None:
    for path in (settings.data_dir / "audio").glob("conv_audio.mp3"):
        path.unlink()
    assert client.get(URL, headers=AUTH).status_code == 404


def test_requested_range_on_an_empty_file() -> None:
    assert requested_range(None, 0) is None
    with pytest.raises(RangeNotSatisfiable):
        requested_range("bytes=0-0", 0)
    with pytest.raises(RangeNotSatisfiable):
        requested_range("bytes=-5", 0)
    assert requested_range("bytes=2-1", 10) is None
    assert requested_range("bytes=0-0", 1) == ByteRange(0, 0)
