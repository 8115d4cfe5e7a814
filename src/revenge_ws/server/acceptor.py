"""The listening sockets, accepted in batches.

``loop.create_server`` on uvloop accepts **one** connection per event-loop iteration:
libuv stopped accepting in a loop (libuv#3696, 2022), relying on level-triggered polling
for the next one. A node busy with a reconnect storm runs a few hundred iterations a
second, so it accepted a few hundred connections a second whatever arrived: the kernel's
accept queue filled (``server.listen_backlog``), clients waited there until their connect
timeout (10 s), and the node's own admission (contract v1.1 §12: the bound on handshakes
in progress, 503 with ``Retry-After`` and a spread window) never saw them, so it never told
anyone to come back later. Measured on a 4,000-user restart on Redis: the queue full for
8 s, 44 handshakes in progress out of 128, no 503.

:class:`Acceptor` accepts up to :data:`ACCEPT_BATCH` connections each time a listening
socket is readable, and hands each to ``loop.connect_accepted_socket``: every waiting
client reaches the admission checks within an iteration or two, and is served or refused
there. Works on any asyncio loop (uvloop or the standard one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["ACCEPT_BATCH", "Acceptor", "listen"]

log = logging.getLogger("revenge_ws.server")

#: Connections accepted per readiness of a listening socket (more wait for the next
#: iteration): bounds the work one iteration takes on for new sockets.
ACCEPT_BATCH = 128
#: When the process is out of file descriptors, accepting pauses this long (s).
EMFILE_PAUSE = 0.5


def listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Non-blocking listening sockets for ``host``:``port`` (every address it resolves to;
    port 0 picks a free one, the same for all), with ``SO_REUSEADDR``."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, like asyncio's create_server.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Serves ``protocol_factory`` on listening sockets until :meth:`close`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._factory = protocol_factory
        self._opening: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    def start(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._ready, sock)

    def _ready(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: waiting clients stay queued in the
                    # kernel; retry shortly rather than spin on a readable socket.
                    log.warning("accept failed (%s); pausing %.1f s", exc, EMFILE_PAUSE)
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(EMFILE_PAUSE, self._resume, sock)
                    return
                continue  # ECONNABORTED and the like concern one connection only
            conn.setblocking(False)
            # Small frames (pongs, acks) leave at once, as on asyncio's own transports.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._ready, sock)

    async def _open(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except Exception as exc:  # the peer reset it meanwhile, or the loop is closing
            log.debug("could not open an accepted connection: %r", exc)
            conn.close()

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay)."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
            sock.close()
