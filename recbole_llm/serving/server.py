"""The uvicorn side of the service: every client's time bounded, a port checked before loading, a graceful stop.

Time is bounded for every client: a request's head and body must each arrive within ``body_timeout``
seconds, and a client that takes none of its answer for as long is dropped; an idle connection is closed
after ``keep_alive_timeout``. On SIGTERM or SIGINT the service stops accepting connections, answers body reads
still in flight with 503, lets model calls finish for up to ``shutdown_timeout`` seconds, and exits. A
client that goes away mid-request costs one log line, not a traceback.

:func:`~recbole_llm.serving.http.serve` runs the application with these classes; uvicorn is imported only
when they are built.
"""

from __future__ import annotations

import asyncio
import json
import logging

from recbole_llm.errors import RecboleLLMError, shown

log = logging.getLogger("uvicorn.error")  # uvicorn formats it: one line per event


def check_can_listen(host: str, port: int) -> None:
    """Bind once before loading anything: a port in use or a host that is not this machine's is one line
    (uvicorn would log an error and exit 3 after the model loaded)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as error:
        raise RecboleLLMError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port "
                              "or --host") from None


class Drain:
    """The service's stop: set when a shutdown begins. Body reads in flight register their deadlines here,
    so that the shutdown can end them at once (with a 503) instead of waiting for slow clients."""

    def __init__(self) -> None:
        self.stopping = False
        self.reads: set[asyncio.Timeout] = set()

    def stop(self) -> None:
        self.stopping = True
        now = asyncio.get_running_loop().time()
        for deadline in self.reads:
            deadline.reschedule(now)


class Guard:
    """ASGI middleware: a request still running when the shutdown drain runs out (uvicorn then cancels it)
    gets a 503 and one log line instead of a traceback."""

    def __init__(self, app, drain: Drain):
        self.app = app
        self.drain = drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except asyncio.CancelledError:
            if not self.drain.stopping:
                raise
            log.warning("%s %s was still running when the shutdown drain ran out; %s", scope["method"],
                        shown(scope["path"]), "its answer was cut" if started else "it got 503")
            if not started:
                body = json.dumps({"error": "the service shut down before answering; send the request again"})
                try:
                    async with asyncio.timeout(1):
                        await send({"type": "http.response.start", "status": 503,
                                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
                        await send({"type": "http.response.body", "body": body.encode()})
                except (TimeoutError, OSError):
                    pass


def protocol_class(timeout: float):
    """uvicorn's h11 protocol with two more deadlines, ``timeout`` seconds each: a request's head (request
    line and headers) must arrive within it from its first byte, and a client must keep taking its answer
    (some of it each ``timeout``), else the connection is dropped. uvicorn's keep-alive timeout ends idle
    connections only after a response; here it also ends a new one that sends nothing."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineProtocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None
        write_watch: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            if self.head_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self.head_deadline = self.loop.call_later(timeout, self._head_timed_out)
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a whole request head arrived
                self._disarm_head_deadline()

        def on_response_complete(self) -> None:
            self._watch_writes(None)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm_head_deadline()
            if self.write_watch is not None:
                self.write_watch.cancel()
            super().connection_lost(exc)

        def _watch_writes(self, unsent_before: int | None) -> None:
            """The answer still buffered here must shrink every ``timeout`` seconds: asyncio holds it, and
            closing the connection waits for it, for as long as a client does not read."""
            if self.write_watch is not None:
                self.write_watch.cancel()
                self.write_watch = None
            unsent = self.transport.get_write_buffer_size()
            if not unsent:
                return
            if unsent_before is not None and unsent >= unsent_before:
                log.warning("%s took none of its answer in %g s (%d bytes unsent); connection dropped",
                            self._who(), timeout, unsent)
                self.transport.abort()
                return
            self.write_watch = self.loop.call_later(timeout, self._watch_writes, unsent)

        def _who(self) -> str:
            return "client %s:%d" % self.client if self.client else "a client"

        def _disarm_head_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

        def _head_timed_out(self) -> None:
            self.head_deadline = None
            if not self.transport.is_closing():
                log.warning("%s sent no whole request head within %g s; connection closed", self._who(), timeout)
                self.timeout_keep_alive_handler()  # uvicorn's close of an idle connection

    return DeadlineProtocol


def server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server; its shutdown first ends the body reads in flight (``Drain``), then drains as
        uvicorn does, for at most ``timeout_graceful_shutdown`` seconds."""

        def __init__(self, config, drain: Drain):
            super().__init__(config)
            self.drain = drain

        async def shutdown(self, sockets=None) -> None:
            self.drain.stop()
            await super().shutdown(sockets)

    return DrainingServer
