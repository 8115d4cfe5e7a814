"""A small TCP balancer for the storm benchmark (scenario c): round-robin over backends,
skipping one whose connect fails — how the clients of a SIGKILLed node land on the
survivor. Plain byte relay with flow control (like a TCP-mode HAProxy): when one side
closes or resets, the other side is closed after its pending bytes are written.

``python -m bench.balancer --port P --backends 127.0.0.1:A,127.0.0.1:B [--core N]``
serves until SIGTERM/SIGINT. Several such processes may share the port (SO_REUSEPORT:
the kernel spreads the connections): a process holds two sockets per client, and the
open-files limit of one process may not cover two per client for every client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import resource
import signal

from .common import HOST, pin, raise_nofile, run_loop

__all__ = ["Balancer"]


class _Side(asyncio.Protocol):
    """One socket of a relayed pair; ``peer`` is the other side's transport."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)  # the backend is still connecting
            return
        if not peer.transport.is_closing():
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.close()  # after what is buffered for it

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()


class _Client(_Side):
    def __init__(self, balancer: Balancer) -> None:
        super().__init__()
        self.balancer = balancer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.balancer.accepted += 1
        task = asyncio.get_running_loop().create_task(self.balancer.attach(self))
        self.balancer.tasks.add(task)
        task.add_done_callback(self.balancer.tasks.discard)


class Balancer:
    def __init__(self, backends: list[tuple[str, int]], connect_timeout: float = 1.0) -> None:
        self.backends = backends
        self.connect_timeout = connect_timeout
        self._next = itertools.cycle(range(len(backends)))
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0
        self.failed_connects = 0

    async def attach(self, client: _Client) -> None:
        loop = asyncio.get_running_loop()
        start = next(self._next)
        for k in range(len(self.backends)):
            host, port = self.backends[(start + k) % len(self.backends)]
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, backend = await loop.create_connection(_Side, host, port)
            except (OSError, TimeoutError):
                self.failed_connects += 1
                continue
            if client.closed:
                if backend.transport is not None:
                    backend.transport.close()
                return
            backend.peer, client.peer = client, backend
            assert backend.transport is not None
            for chunk in client.pending:
                backend.transport.write(chunk)
            client.pending.clear()
            return
        if client.transport is not None:
            client.transport.close()  # no backend: the client sees the connection close


async def serve(port: int, backends: list[tuple[str, int]]) -> None:
    loop = asyncio.get_running_loop()
    balancer = Balancer(backends)
    server = await loop.create_server(
        lambda: _Client(balancer), HOST, port, backlog=4096, reuse_address=True, reuse_port=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backends", required=True, help="host:port,host:port")
    ap.add_argument("--core", type=int, default=None)
    args = ap.parse_args()
    if args.core is not None:
        pin({args.core})
    # Two sockets per client: 10,000 clients need more than a 20,000 hard limit; root may
    # raise it (up to fs.nr_open).
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
    raise_nofile()
    backends = []
    for item in args.backends.split(","):
        host, _, p = item.strip().rpartition(":")
        backends.append((host or HOST, int(p)))
    run_loop(serve(args.port, backends))


if __name__ == "__main__":
    main()
