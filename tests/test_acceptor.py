"""``server/acceptor.py``: every waiting connection is accepted at the next readiness
(up to a batch), not one per loop iteration; the sockets listen where asked."""

from __future__ import annotations

import asyncio
import socket

import pytest

from revenge_ws.server.acceptor import ACCEPT_BATCH, Acceptor, listen


class Counting(asyncio.Protocol):
    made: list[asyncio.BaseTransport] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counting.made.append(transport)


async def test_one_readiness_accepts_a_batch_of_waiting_connections() -> None:
    loop = asyncio.get_running_loop()
    socks = listen("127.0.0.1", 0, 512)
    acceptor = Acceptor(loop, socks, Counting)
    Counting.made = []
    clients: list[socket.socket] = []
    try:
        port = acceptor.port
        assert socks[0].getsockname() == ("127.0.0.1", port)
        for _ in range(ACCEPT_BATCH + 20):  # all queued in the kernel before any accept
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(c)
        acceptor._ready(socks[0])  # one readiness: a whole batch, the rest stays queued
        assert len(acceptor._opening) == ACCEPT_BATCH
        acceptor.start()
        for _ in range(200):
            if len(Counting.made) == len(clients):
                break
            await asyncio.sleep(0.01)
        assert len(Counting.made) == len(clients)
        nodelay = [
            t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for t in Counting.made
        ]
        assert all(nodelay)
    finally:
        acceptor.close()
        for t in Counting.made:
            t.close()
        for c in clients:
            c.close()
    with pytest.raises(OSError):  # closed: nobody listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_listen_refuses_a_port_in_use_and_cleans_up() -> None:
    first = listen("127.0.0.1", 0, 16)
    try:
        port = first[0].getsockname()[1]
        with pytest.raises(OSError):
            listen("127.0.0.1", port, 16)
    finally:
        for s in first:
            s.close()
