"""Reading the client's request body: gap timeout, size limit, replay buffering."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.errors import ProxyError
from proxy.stages.call import EMPTY_BODY, ByteSource, RequestBody


class ClientBodyTimeout(Exception):
    """The client paused longer than limits.client_body_timeout between body chunks."""


class BodyTooLarge(Exception):
    """The client sent more than limits.max_request_body."""


async def read_gap(stream: ByteSource, gap: float | None) -> bytes:
    """The next chunk of the body (b"" at its end), waiting at most `gap` seconds."""
    if gap is None:
        return await stream.readany()
    try:
        async with asyncio.timeout(gap):
            return await stream.readany()
    except TimeoutError:
        raise ClientBodyTimeout() from None


async def prepare_body(
    stream: aiohttp.StreamReader,
    *,
    content_length: int | None,
    chunked: bool,
    max_body: int,
    replay_limit: int,
    gap: float | None,
) -> RequestBody:
    """Buffer the body when it fits `replay_limit` (so it can be replayed), else stream it.

    A body of unknown length is read up to `replay_limit`; if it goes on, what was read is
    sent first and the rest streams (not replayable). `max_body` is enforced while reading.
    """
    if content_length is not None and content_length > max_body:
        raise ProxyError.body_too_large(max_body)
    if not chunked and not content_length:
        return EMPTY_BODY
    if content_length is not None and content_length > replay_limit:
        return RequestBody(None, _Limited(stream, max_body), gap_timeout=gap, length=content_length)
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await read_gap(stream, gap)
        if not chunk:
            return RequestBody(b"".join(parts), length=size)
        size += len(chunk)
        if size > max_body:
            raise ProxyError.body_too_large(max_body)
        parts.append(chunk)
        if size > replay_limit:
            return RequestBody(
                None, _Limited(stream, max_body - size), prefix=b"".join(parts), gap_timeout=gap
            )


class _Limited:
    """A stream wrapper that stops the upload once it exceeds the size limit."""

    __slots__ = ("_left", "_stream")

    def __init__(self, stream: aiohttp.StreamReader, left: int) -> None:
        self._stream = stream
        self._left = left

    async def readany(self) -> bytes:
        chunk = await self._stream.readany()
        self._left -= len(chunk)
        if self._left < 0:
            raise BodyTooLarge()
        return chunk
