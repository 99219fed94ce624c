"""Split a streamed post-call audio body into its small JSON skeleton and its decoded audio.

An audio webhook is `{"type": "post_call_audio", "data": {..., "full_audio": "<tens of MB of base64>"}}`.
Holding that string (and its decoded copy) in memory is what makes naive receivers peak at hundreds of MB,
so `AudioSplitter` walks the JSON structure as it streams and sends the characters of `data.full_audio`
to a sink instead of keeping them; the rest, with `"full_audio": ""`, stays small enough for `json.loads`.
The walker only tracks enough structure to know where it is; `json.loads` of the skeleton validates the rest.
Pure: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Callable

import pybase64

MAX_DEPTH = 256
AUDIO_PATH = (b"data", b"full_audio")

_STRUCTURAL = frozenset(b'{}[]:,"')
_DROPPED_ESCAPES = frozenset(b"nrt")  # line breaks inside base64 carry no data


class StreamFormatError(Exception):
    """The body cannot be a valid audio payload (bad nesting, bad base64)."""


class _Frame:
    __slots__ = ("expect_key", "is_object", "key")

    def __init__(self, is_object: bool) -> None:
        self.is_object = is_object
        self.expect_key = is_object
        self.key: bytes | None = None


class AudioSplitter:
    """Feed body chunks in order; `audio_sink` receives the unescaped text of `data.full_audio`."""

    def __init__(self, audio_sink: Callable[[bytes], None]) -> None:
        self._sink = audio_sink
        self._stack: list[_Frame] = []
        self._skeleton = bytearray()
        self._in_string = False
        self._divert = False
        self._string_is_key = False
        self._key = bytearray()
        self._escape_pending = False
        self.found_audio = False

    @property
    def skeleton_size(self) -> int:
        return len(self._skeleton)

    def feed(self, chunk: bytes) -> None:
        pos, end = 0, len(chunk)
        while pos < end:
            pos = self._string(chunk, pos) if self._in_string else self._structure(chunk, pos)

    def finish(self) -> bytes:
        """The body without the audio text; raise StreamFormatError if the stream ended mid-value."""
        if self._in_string or self._stack:
            raise StreamFormatError("body ended inside a JSON value")
        return bytes(self._skeleton)

    def _structure(self, chunk: bytes, pos: int) -> int:
        end = len(chunk)
        start = pos
        while pos < end:
            byte = chunk[pos]
            if byte not in _STRUCTURAL:
                pos += 1
                continue
            if byte == 0x22:  # '"'
                self._skeleton += chunk[start : pos + 1]
                self._open_string()
                return pos + 1
            self._punctuation(byte)
            pos += 1
        self._skeleton += chunk[start:end]
        return end

    def _punctuation(self, byte: int) -> None:
        stack = self._stack
        if byte in b"{[":
            if len(stack) >= MAX_DEPTH:
                raise StreamFormatError("JSON nested too deeply")
            stack.append(_Frame(is_object=byte == 0x7B))
        elif byte in b"}]":
            if not stack:
                raise StreamFormatError("unbalanced JSON")
            stack.pop()
        elif stack and stack[-1].is_object:
            stack[-1].expect_key = byte == 0x2C  # ',' starts a key; ':' a value

    def _open_string(self) -> None:
        self._in_string = True
        top = self._stack[-1] if self._stack else None
        self._string_is_key = bool(top and top.is_object and top.expect_key)
        self._key.clear()
        self._divert = not self._string_is_key and not self.found_audio and self._at_audio_path()
        if self._divert:
            self.found_audio = True

    def _at_audio_path(self) -> bool:
        stack = self._stack
        return (
            len(stack) == len(AUDIO_PATH)
            and all(frame.is_object for frame in stack)
            and tuple(frame.key for frame in stack) == AUDIO_PATH
        )

    def _string(self, chunk: bytes, pos: int) -> int:
        if self._escape_pending:
            self._escape_pending = False
            self._take_escaped(chunk[pos : pos + 1])
            return pos + 1
        # Two memchr-speed scans instead of one regex search: the audio string is tens of MB and the regex
        # engine crawled through it at ~200 MB/s, the slowest step of taking an audio webhook.
        quote = chunk.find(b'"', pos)
        stop = chunk.find(b"\\", pos, len(chunk) if quote < 0 else quote)
        if stop < 0:
            stop = quote
        if stop < 0:
            self._take(chunk[pos:])
            return len(chunk)
        self._take(chunk[pos:stop])
        if chunk[stop] == 0x5C:  # backslash: the next byte (maybe in the next chunk) is escaped
            if stop + 1 < len(chunk):
                self._take_escaped(chunk[stop + 1 : stop + 2])
                return stop + 2
            self._escape_pending = True
            return stop + 1
        self._close_string()
        return stop + 1

    def _take(self, text: bytes) -> None:
        if not text:
            return
        if self._divert:
            self._sink(text)
            return
        self._skeleton += text
        if self._string_is_key:
            self._key += text

    def _take_escaped(self, char: bytes) -> None:
        if not self._divert:
            self._take(b"\\" + char)
        elif char[0] not in _DROPPED_ESCAPES:
            if char == b"u":
                raise StreamFormatError("unicode escape inside audio")
            self._sink(char)  # '\/' is the common one: some encoders escape slashes

    def _close_string(self) -> None:
        self._in_string = False
        self._skeleton += b'"'
        if self._string_is_key and self._stack:
            self._stack[-1].key = bytes(self._key)
        self._divert = False


class Base64Decoder:
    """Decode base64 text arriving in arbitrary pieces, writing whole 4-character groups as they complete."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self._write = write
        self._carry = b""
        self.decoded_bytes = 0

    def feed(self, text: bytes) -> None:
        data = self._carry + text if self._carry else text
        usable = len(data) - len(data) % 4
        self._carry = data[usable:]
        if usable:
            self._emit(data[:usable] if usable < len(data) else data)

    def finish(self) -> None:
        if self._carry:
            raise StreamFormatError("audio base64 length is not a multiple of 4")

    def _emit(self, text: bytes) -> None:
        try:
            decoded = pybase64.b64decode(text, validate=True)
        except ValueError as exc:  # binascii.Error is a ValueError
            raise StreamFormatError("audio is not valid base64") from exc
        self.decoded_bytes += len(decoded)
        self._write(decoded)
