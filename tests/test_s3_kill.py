"""`kill -9` of a real `postcall serve` while an audio webhook's multipart upload is open in the bucket: after the
restart nothing of it is visible or claimed, and the same delivery then stores the audio byte-identical."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine

from service.storage.s3 import PART_BYTES, make_client
from tests.reliability.support import records, server_env, serving
from tests.support.audio_body import BLOCK, AudioBody, blocks_for
from tests.support.s3 import aws_environment, new_bucket_name
from tests.support.tcp_proxy import BUFFER_BYTES, TcpProxy

pytestmark = pytest.mark.s3
CID = "conv_killed_mid_upload"
BOUND_SECONDS = 60  # how long a step may take before the test gives up: a hang, not a measurement


# The request line of an UploadPart for part 2 (boto3 puts the query's parameters in either order).
PART_2 = re.compile(rb"PUT [^ \r\n]*[?&]partNumber=2(?:&[^ \r\n]*)? HTTP/1\.1\r\n")


class HoldsTheSecondPart(TcpProxy):
    """Forwards to the store until a request for a multipart upload's part 2 comes by, and holds that request
    (and whatever its connection sends after it) forever: part 1 is in, the upload is open and stays open."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(upstream)
        self.holding = threading.Event()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(BUFFER_BYTES):
                if PART_2.search(data):
                    self.holding.set()
                    return  # never forwarded; close() resets both ends
                sink.sendall(data)
        except OSError:
            pass
        super()._pump(source, sink)  # already closed: only hangs up the other end


def objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = make_client(endpoint)
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


def open_uploads(endpoint: str, bucket: str) -> list[Any]:
    return list(make_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def post(url: str, body: AudioBody) -> httpx.Response:
    headers = {"ElevenLabs-Signature": body.signature(int(time.time())), "Content-Type": "application/json"}
    return httpx.post(f"{url}/webhooks/elevenlabs", content=body.pieces(), headers=headers, timeout=BOUND_SECONDS)


def test_kill_9_mid_upload_leaves_nothing_claimed_and_the_redelivery_stores_the_audio(
    database_url: str, engine: Engine, tmp_path: Path, s3_endpoint: str
) -> None:
    bucket = new_bucket_name()
    make_client(s3_endpoint).create_bucket(Bucket=bucket)
    body = AudioBody(CID, blocks_for(10))  # two parts: part 1 goes up while decoding, part 2 at the end
    assert body.audio_bytes > PART_BYTES
    # grace=0: the restart settles at once what the killed writer left (in production, an hour later).
    store = {"POSTCALL_AUDIO_STORE": f"s3://{bucket}/rec?grace=0", **aws_environment()}
    env = server_env(database_url, tmp_path / "data", **store)
    log = tmp_path / "serve.log"
    host, port = s3_endpoint.removeprefix("http://").split(":")

    with HoldsTheSecondPart((host, int(port))) as proxy:
        through_proxy = {**env, "POSTCALL_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        with serving(through_proxy, log, "--no-migrate") as server:
            answers: list[httpx.Response | Exception] = []
            sender = threading.Thread(target=lambda: answers.append(_post_or_error(server.url, body)), daemon=True)
            sender.start()
            assert proxy.holding.wait(BOUND_SECONDS), "the upload never reached its second part"
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait(BOUND_SECONDS)
            sender.join(BOUND_SECONDS)
        assert server.proc.returncode == -signal.SIGKILL
        assert len(answers) == 1 and isinstance(answers[0], httpx.TransportError)  # never answered: no 200
    assert len(open_uploads(s3_endpoint, bucket)) == 1  # killed with the upload open, part 1 in

    with serving({**env, "POSTCALL_S3_ENDPOINT_URL": s3_endpoint}, log, "--no-migrate") as restarted:
        # Nothing half-written is visible or claimed: the upload aborted by the start-up, no object, no record
        # saying the audio is stored.
        assert open_uploads(s3_endpoint, bucket) == []
        assert objects(s3_endpoint, bucket) == {}
        record = records(engine).get(CID)
        assert record is None or not record["audio_stored"]

        redelivered = post(restarted.url, body)  # ElevenLabs' retry of the same body, signed anew
        assert redelivered.status_code == 200, redelivered.text
        assert redelivered.json()["status"] == "accepted"
    record = records(engine)[CID]
    assert record["audio_stored"] and record["audio_bytes"] == body.audio_bytes
    assert objects(s3_endpoint, bucket) == {f"rec/{record['audio_path']}": BLOCK * body.blocks}
    assert open_uploads(s3_endpoint, bucket) == []


def _post_or_error(url: str, body: AudioBody) -> httpx.Response | Exception:
    try:
        return post(url, body)
    except httpx.TransportError as exc:
        return exc
