"""The only code that talks to upstreams.

`UpstreamClient.send` makes one attempt and returns the response once its head has arrived,
or raises `UpstreamFailure` classified as `connect-failure` (nothing was written: safe to
retry for any replayable body) or `reset`. It follows no redirects, keeps no cookies,
decodes no content codings and adds no default headers. Timeouts are the caller's: the
attempt stage bounds `send` by the attempt deadline; `connect_timeout` bounds a new TCP+TLS
connection (waiting for a pooled connection is not a failure).
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterable
from typing import Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from proxy.config.model import Upstream


class UpstreamFailure(Exception):
    """One attempt failed before a response head arrived."""

    def __init__(self, kind: str, *, before_request: bool) -> None:
        super().__init__(kind)
        self.kind = kind  # "connect-failure" | "reset"
        self.before_request = before_request


class UpstreamResponse(Protocol):
    status: int

    @property
    def headers(self) -> CIMultiDict[str] | aiohttp.typedefs.LooseHeaders: ...


RequestBody = bytes | AsyncIterable[bytes] | None

# The aiohttp client adds these unless told not to; the proxy adds nothing of its own.
_SKIP_AUTO_HEADERS = frozenset(("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))


def _ssl_context(upstream: Upstream) -> ssl.SSLContext | bool:
    if upstream.scheme != "https":
        return False
    if not upstream.tls.verify:
        return False
    ctx = ssl.create_default_context(cafile=upstream.tls.ca_file)
    return ctx


class UpstreamClient:
    """A keep-alive connection pool for one upstream."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.in_flight = 0  # attempts waiting for a response head
        self.streaming = 0  # responses whose body is being relayed
        self._session: aiohttp.ClientSession | None = None
        self._base = upstream.url[: len(upstream.url) - len(upstream.base_path)]
        # URL userinfo is sent as Basic auth, unless an injected Authorization header wins.
        self._auth: str | None = None
        if upstream.userinfo and not any(n.lower() == "authorization" for n, _ in upstream.headers):
            user, password = upstream.userinfo
            self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def _make_session(self) -> aiohttp.ClientSession:
        up = self.upstream
        connector = aiohttp.TCPConnector(
            limit=up.max_connections,
            limit_per_host=0,
            ssl=_ssl_context(up),
            ttl_dns_cache=30,
            enable_cleanup_closed=False,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=up.connect_timeout),
            raise_for_status=False,
            trust_env=False,
            requote_redirect_url=False,
        )
        # aiohttp silently replays idempotent requests once on a broken pooled connection;
        # the route's retry policy is the only place retries happen, so attempts, budgets
        # and breaker records stay honest (aiohttp's own test client turns it off the same way).
        session._retry_connection = False
        return session

    async def send(
        self,
        method: str,
        path_and_query: str,
        headers: CIMultiDict[str],
        body: RequestBody,
    ) -> aiohttp.ClientResponse:
        session = self._session
        if session is None:
            session = self._session = self._make_session()
        url = URL(self._base + path_and_query, encoded=True)
        if self._auth is not None:
            headers["Authorization"] = self._auth
        try:
            return await session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamFailure("connect-failure", before_request=True) from exc
        except aiohttp.ClientConnectionError as exc:
            # ServerDisconnectedError, ClientOSError (ECONNRESET), ClientPayloadError on write...
            raise UpstreamFailure("reset", before_request=False) from exc

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
