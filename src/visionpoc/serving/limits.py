"""The service's limits against slow or too many clients: a bounded queue of uploads (`Admission`: over
it, 503 with `Retry-After`), a deadline on each request's headers (`HeaderDeadlineH11`, uvicorn's h11
protocol that drops a connection whose headers do not arrive in time: slowloris), the uvicorn settings
`serve` runs with (`server_settings`: connection limit, keep-alive and header-size bounds), and the Host
names accepted when the service is bound to loopback (`trusted_hosts`: DNS rebinding).

The upload body's own deadline is applied where the body is read, in `app.py`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from visionpoc.serving.uploads import UploadError

log = logging.getLogger(__name__)

MAX_QUEUED_PREDICTIONS = 16  # uploads waiting for a prediction slot (or being read); more get a 503
RETRY_AFTER_S = 2  # the Retry-After of a 503: predictions take well under a second each on a CPU
BODY_TIMEOUT_S = 30.0  # the whole upload must arrive within this (10 MB at >= 350 KB/s)
HEADER_TIMEOUT_S = 10.0  # a request's line and headers must arrive within this of connecting (or of the last answer)
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this
MAX_CONNECTIONS = 100  # open connections (and tasks) at once; over it uvicorn answers 503
MAX_HEADER_BYTES = 16 * 1024  # a request line and headers larger than this are refused (400)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # accepted Host names when bound to loopback


class Admission:
    """Counts the uploads in the service (being read, waiting for a slot or predicted) and refuses one
    more than `limit` with a 503: the queue is bounded, so the memory of the read bodies and the threads
    waiting for a slot are too. A thread lock: test clients call from several event loops."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    @contextmanager
    def enter(self) -> Iterator[None]:
        with self._lock:
            if self.count >= self.limit:
                raise UploadError(
                    503, f"the service is busy ({self.limit} uploads in progress): retry in {RETRY_AFTER_S} s"
                )
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request line and headers
    within `header_timeout_s` of connecting or of its previous answer (uvicorn's keep-alive timeout alone
    is disarmed by the first byte, so a client trickling header bytes held its socket forever)."""

    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            log.info(
                "closed the connection of %s: no complete request headers within %g s",
                f"{self.client[0]}:{self.client[1]}" if self.client else "a client",
                self.header_timeout_s,
            )
            self.transport.close()


def server_settings() -> dict[str, Any]:
    """The uvicorn settings (keyword arguments of `uvicorn.run` / `uvicorn.Config`) `serve` runs with."""
    return {
        "server_header": False,
        "http": HeaderDeadlineH11,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "limit_concurrency": MAX_CONNECTIONS,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address or a name) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(bind: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The Host header names the service accepts when bound to `bind`: on loopback, the loopback names
    (any port) plus `extra`; elsewhere any name (None), unless `extra` names some."""
    if not is_loopback(bind) and not extra:
        return None
    names = list(LOOPBACK_HOSTS)
    if is_loopback(bind) and bind != "localhost":
        address = ipaddress.ip_address(bind.strip("[]"))
        names.append(f"[{address}]" if address.version == 6 else str(address))
    return list(dict.fromkeys(n.lower() for n in [*names, *extra]))
