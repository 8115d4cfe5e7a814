"""One query for many waiters: the reads of a reconnect storm, coalesced.

When thousands of clients come back within seconds, each one's connect work asks the
store the same kind of question (its unacknowledged notifications). Asked one by one,
every question costs a round trip (a thread hop for SQLite, a network round trip for
PostgreSQL) that dominates the reconnect. :class:`Coalescer` queues the questions and
asks them in batches: while one batch is being answered, the next one fills.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Coalescer"]

K = TypeVar("K")
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """``await get(key)`` answers ``fetch([...keys...])[key]``, one ``fetch`` at a time
    for everything queued meanwhile (at most ``max_keys`` keys per call).

    Guarantees: every waiter gets its answer or the exception of the ``fetch`` its key
    was in (a key missing from the answer is a ``KeyError``); a waiter that is cancelled
    leaves the others alone; nothing waits longer than ``timeout`` seconds for its
    answer (``TimeoutError``). The queue holds at most ``max_waiting`` waiters; past it
    ``get`` asks ``fetch`` alone, without queueing (no unbounded growth, no refusal).
    A batch that is not full waits ``gather`` seconds for company before its fetch.
    """

    def __init__(
        self,
        fetch: Callable[[Sequence[K]], Awaitable[dict[K, V]]],
        *,
        max_keys: int = 500,
        max_waiting: int = 100_000,
        timeout: float = 30.0,
        gather: float = 0.0,
    ) -> None:
        self._fetch = fetch
        #: Seconds a batch waits for company before its first fetch.
        self.gather = gather
        self.max_keys = max_keys
        self.max_waiting = max_waiting
        self.timeout = timeout
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._queued = 0
        self._runner: asyncio.Task[None] | None = None
        #: Calls of ``fetch`` made (observability and tests).
        self.fetches = 0

    async def get(self, key: K) -> V:
        if self._queued >= self.max_waiting:
            self.fetches += 1
            async with asyncio.timeout(self.timeout):
                return (await self._fetch([key]))[key]
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(fut)
        self._queued += 1
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        async with asyncio.timeout(self.timeout):
            return await fut

    async def _run(self) -> None:
        while self._waiting:
            if len(self._waiting) < self.max_keys:
                # Let company arrive first: the handshakes handled in this loop iteration
                # at least, and those of the next ``gather`` seconds.
                await asyncio.sleep(self.gather)
            keys = list(self._waiting)[: self.max_keys]
            batch = {k: self._waiting.pop(k) for k in keys}
            self._queued -= sum(len(f) for f in batch.values())
            self.fetches += 1
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await self._fetch(keys)
            except Exception as exc:
                for futs in batch.values():
                    for fut in futs:
                        if not fut.done():
                            fut.set_exception(exc)
                continue
            for key, futs in batch.items():
                for fut in futs:
                    if fut.done():
                        continue  # its waiter gave up
                    if key in answer:
                        fut.set_result(answer[key])
                    else:
                        fut.set_exception(KeyError(key))
