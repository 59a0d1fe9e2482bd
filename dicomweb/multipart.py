"""multipart/related (RFC 2387) for DICOMweb: a streaming encoder and a small decoder.

The encoder takes parts whose bodies are iterators of chunks, so a study of any size goes
out with one chunk of one file in memory at a time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

CHUNK_SIZE = 256 * 1024
COALESCE_SIZE = 1024 * 1024


@dataclass(frozen=True)
class Part:
    """One body part: its Content-Type, its content as chunks, and optional headers."""

    content_type: str
    chunks: Iterable[bytes]
    location: str | None = None


def new_boundary() -> str:
    return f"vannah-{uuid.uuid4().hex}"


def content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """The Content-Type of a multipart/related answer (the part type quoted, PS3.18 8.7.3)."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax is not None:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def read_chunks(open_stream: Callable[[], BinaryIO], size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The bytes of a stream opened only when first iterated, `size` at a time; the stream
    is closed when done or when the consumer stops early."""
    with open_stream() as stream:
        while chunk := stream.read(size):
            yield chunk


def chunked(data: bytes, size: int = CHUNK_SIZE) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def encode_parts(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """Stream the body of a multipart/related message made of `parts`, in blocks of about
    COALESCE_SIZE bytes (each block the server sends costs a hop to the event loop)."""
    pending = bytearray()
    for piece in _pieces(parts, boundary):
        pending += piece
        if len(pending) >= COALESCE_SIZE:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


def _pieces(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    first = True
    for part in parts:
        head = b"" if first else b"\r\n"
        head += f"--{boundary}\r\nContent-Type: {part.content_type}\r\n".encode("ascii")
        if part.location is not None:
            head += f"Content-Location: {part.location}\r\n".encode("ascii")
        yield head + b"\r\n"
        first = False
        for chunk in part.chunks:
            if chunk:
                yield chunk
    yield f"{'' if first else chr(13) + chr(10)}--{boundary}--\r\n".encode("ascii")


def boundary_of(content_type_value: str) -> str | None:
    """The boundary parameter of a Content-Type value."""
    for piece in content_type_value.split(";")[1:]:
        name, _, value = piece.partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"')
    return None


def decode_parts(body: bytes, content_type_value: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a whole multipart/related body into (headers, content) pairs (header names
    lower-cased).

    Raises
    ------
    ValueError
        If there is no boundary or the body does not follow it.
    """
    boundary = boundary_of(content_type_value)
    if not boundary:
        raise ValueError("no boundary in the Content-Type")
    delimiter = b"--" + boundary.encode("ascii")
    if not body.startswith(delimiter):
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise ValueError("the body does not start with the boundary")
        body = body[start + 2 :]
    parts: list[tuple[dict[str, str], bytes]] = []
    for chunk in body.split(b"\r\n" + delimiter)[0:]:
        if chunk.startswith(delimiter):
            chunk = chunk[len(delimiter) :]
        if chunk.startswith(b"--"):
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without a blank line after its headers")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts
