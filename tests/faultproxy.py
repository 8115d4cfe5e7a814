"""A fault-injecting TCP proxy for end-to-end tests (asyncio, 127.0.0.1 only).

It forwards bytes between clients and one target and can, at any moment:

- delay each direction separately (``up`` = client → server, ``down`` = server → client),
  like a network path with asymmetric latency; order is always kept;
- add ``jitter``: a random extra delay, uniform in ``[0, jitter]`` and drawn per chunk read
  (seeded), like queueing on a real path. Order is still kept: a chunk never overtakes an
  earlier one, it waits behind it (head-of-line blocking, as within one TCP stream);
- ``pause()`` forwarding on every link (a silent server / a black hole) and ``resume()``;
- ``cut()`` every open link (both sockets reset), and ``refuse()`` new connections
  (accepted, then reset at once) until ``accept()``.

Everything is bounded: at most ``max_links`` links, at most ``max_chunks`` chunks queued
per direction (the reader waits beyond that), and ``stop()`` ends every task.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultProxy"]

_CHUNK = 65536


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for w in (self.client, self.server):
            with contextlib.suppress(Exception):
                w.transport.abort()
        for t in self.tasks:
            t.cancel()


class FaultProxy:
    """``async with FaultProxy(target_port) as proxy: proxy.ws_url ...``"""

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        up_delay: float = 0.0,
        down_delay: float = 0.0,
        jitter: float = 0.0,
        seed: int | None = None,
        max_links: int = 64,
        max_chunks: int = 1024,
    ) -> None:
        if jitter < 0:
            raise ValueError("jitter must be >= 0")
        self.target = (target_host, target_port)
        self.up_delay = up_delay
        self.down_delay = down_delay
        self.jitter = jitter
        self._rng = random.Random(seed)
        #: Chunks that got a non-zero extra delay, and the largest one (s).
        self.jittered = 0
        self.max_jitter_seen = 0.0
        self.max_links = max_links
        self.max_chunks = max_chunks
        self.accepted = 0
        self.refused = 0
        self.cuts = 0
        self._links: set[_Link] = set()
        self._refusing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        tasks = list(self._handlers)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def url(self, path: str = "/api/v1/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def ws_url(self) -> str:
        return self.url()

    @property
    def links(self) -> int:
        return len(self._links)

    # -- faults --------------------------------------------------------------------
    def set_delays(self, up: float, down: float) -> None:
        """One-way delays (s) for bytes read from now on."""
        self.up_delay, self.down_delay = up, down

    def set_jitter(self, jitter: float) -> None:
        """Largest random extra delay (s) per chunk read from now on (0: none)."""
        if jitter < 0:
            raise ValueError("jitter must be >= 0")
        self.jitter = jitter

    def _extra(self) -> float:
        if self.jitter <= 0:
            return 0.0
        extra = self._rng.uniform(0.0, self.jitter)
        if extra > 0:
            self.jittered += 1
            self.max_jitter_seen = max(self.max_jitter_seen, extra)
        return extra

    def pause(self) -> None:
        """Stop forwarding on every link (bytes are held, bounded, until resume)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def refuse(self) -> None:
        """Reset new connections as soon as they are accepted."""
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    def cut(self) -> int:
        """Reset every open link (both sides); returns how many were cut."""
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        self.cuts += len(links)
        return len(links)

    # -- plumbing --------------------------------------------------------------------
    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self._refusing or len(self._links) >= self.max_links:
            self.refused += 1
            cwriter.transport.abort()
            return
        try:
            sreader, swriter = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            self.refused += 1
            cwriter.transport.abort()
            return
        self.accepted += 1
        link = _Link(cwriter, swriter)
        self._links.add(link)
        up = self._pipe(creader, swriter, lambda: self.up_delay)
        down = self._pipe(sreader, cwriter, lambda: self.down_delay)
        link.tasks = [asyncio.create_task(up), asyncio.create_task(down)]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.abort()

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        delay: Any,
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.max_chunks)

        async def read() -> None:
            while True:
                try:
                    data = await src.read(_CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                # FIFO: a chunk due before an earlier, more delayed one waits for it.
                await queue.put((loop.time() + float(delay()) + self._extra(), data))
                if not data:
                    return

        reader = asyncio.create_task(read())
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                if not data:
                    with contextlib.suppress(Exception):
                        dst.close()
                    return
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
