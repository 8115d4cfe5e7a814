"""Automatic pipelining of a node's small Redis calls.

During a reconnect storm a node runs a hundred handshakes at once, each waiting on a few
short Redis calls (the admission's revocation check and connection count, the history of
every channel it subscribes, presence entries). Sent one by one, each call costs the node a
``write()`` to Redis, a pooled connection and a wait of its own: in a profile of a
10,000-user restart on Redis, the writes alone were a fifth of the node's CPU.
:class:`AutoPipeline` sends the calls made during one event-loop iteration as one
pipeline (non-transactional: one round trip, the same replies in order), the way
ioredis' and node-redis' auto-pipelining do; redis-py has no such mode.

Guarantees: each call gets its own reply or its own error (an error reply fails that call
only; a failed round trip fails every call of it); calls are sent in the order they were
made; nothing is retried (a retried write could apply twice). A call whose caller stopped
waiting (a timeout) is still sent and its reply dropped. At most :data:`MAX_BATCH` calls
per pipeline; idle, a call waits one loop iteration more than a direct one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

__all__ = ["MAX_BATCH", "AutoPipeline"]

#: Calls per pipeline: bounds one round trip's size and the reply the node parses at once.
MAX_BATCH = 256

_Call = tuple[AsyncScript | None, tuple[Any, ...], "asyncio.Future[Any]"]


class AutoPipeline:
    """Queues calls for the current loop iteration; :meth:`close` cancels what is in flight."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queue: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """EVALSHA ``script`` (loaded first if Redis lacks it) in the next pipeline."""
        return self._add(script, (keys, args))

    def command(self, *args: Any) -> asyncio.Future[Any]:
        """A plain command (``"GET", key``) in the next pipeline; its raw reply."""
        return self._add(None, args)

    async def all(self, calls: list[asyncio.Future[Any]]) -> list[Any]:
        """The replies of ``calls`` (made with :meth:`script` / :meth:`command`) in order;
        once every one is settled, the first error is raised (none is left unretrieved)."""
        replies = await asyncio.gather(*calls, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    def _add(self, script: AsyncScript | None, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((script, args, fut))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), MAX_BATCH):
            task = asyncio.create_task(self._execute(queue[i : i + MAX_BATCH]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[_Call]) -> None:
        try:
            # ``async with``: the pipeline gives its pooled connection back also when it is
            # cancelled midway.
            async with self._redis.pipeline(transaction=False) as pipe:
                for script, args, _ in batch:
                    if script is None:
                        pipe.execute_command(*args)
                    else:
                        await script(args[0], args[1], client=pipe)
                replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else asyncio.CancelledError()
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue  # its caller gave up waiting
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    async def close(self) -> None:
        """Cancel the pipelines in flight (their callers get ``CancelledError``)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
