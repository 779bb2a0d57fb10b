"""A minimal HTTP/1.1 client on asyncio streams, for streamed POSTs to plain-http servers.

httpx costs its caller about 0.2 ms of CPU per streamed chunk (anyio, h11 and httpcore layers);
on a 2-core machine that shares its CPUs with the server under test, that is CPU the server does not
get. This client does only what a streamed completion needs: one request per connection
(`Connection: close`), a status line, headers, and a chunked or close-delimited body, handed to the
caller chunk by chunk as it arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit


class HTTPStatusError(Exception):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200].decode(errors='replace')}")
        self.status = status


def split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"raw client needs an http:// URL, got {url!r}")
    return parts.hostname, parts.port or 80, parts.path or "/"


async def _read_body(reader: asyncio.StreamReader, chunked: bool, on_data: Callable[[bytes], None]) -> None:
    if not chunked:
        while data := await reader.read(1 << 16):
            on_data(data)
        return
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)
        on_data(data[:-2])


async def post_stream(
    url: str, headers: dict[str, str], body: bytes, on_data: Callable[[bytes], None]
) -> None:
    """POST `body` to `url` and call `on_data` with each piece of the response body as it arrives;
    raises HTTPStatusError for a non-200 answer."""
    host, port, path = split_url(url)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        head += [f"Content-Length: {len(body)}", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        status = int((await reader.readuntil(b"\r\n")).split(b" ", 2)[1])
        fields: dict[bytes, bytes] = {}
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip().lower()
        chunked = fields.get(b"transfer-encoding") == b"chunked"
        if status != 200:
            error = bytearray()
            await _read_body(reader, chunked, error.extend)
            raise HTTPStatusError(status, bytes(error))
        await _read_body(reader, chunked, on_data)
    finally:
        writer.close()
