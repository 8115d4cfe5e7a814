"""The read coalescer of reconnect storms (core/batch.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from revenge_ws.core.batch import Coalescer


async def test_reads_queued_together_share_one_fetch() -> None:
    calls: list[list[str]] = []

    async def fetch(keys: Sequence[str]) -> dict[str, int]:
        calls.append(list(keys))
        await asyncio.sleep(0.01)
        return {k: len(k) for k in keys}

    co: Coalescer[str, int] = Coalescer(fetch, max_keys=3)
    got = await asyncio.gather(*(co.get(k) for k in ["a", "bb", "a", "ccc", "dddd"]))
    assert got == [1, 2, 1, 3, 4]
    # The repeated key is asked once; the fourth distinct key waits for the next batch.
    assert calls == [["a", "bb", "ccc"], ["dddd"]]
    assert co.fetches == 2


async def test_a_failed_fetch_fails_its_waiters_only() -> None:
    async def fetch(keys: Sequence[str]) -> dict[str, int]:
        if "bad" in keys:
            raise OSError("store down")
        return {k: 1 for k in keys if k != "missing"}

    co: Coalescer[str, int] = Coalescer(fetch, max_keys=1)
    results = await asyncio.gather(
        co.get("bad"), co.get("good"), co.get("missing"), return_exceptions=True
    )
    assert isinstance(results[0], OSError)
    assert results[1] == 1
    assert isinstance(results[2], KeyError)


async def test_a_cancelled_waiter_leaves_the_others_alone() -> None:
    release = asyncio.Event()

    async def fetch(keys: Sequence[str]) -> dict[str, int]:
        await release.wait()
        return {k: 7 for k in keys}

    co: Coalescer[str, int] = Coalescer(fetch)
    first = asyncio.create_task(co.get("x"))
    second = asyncio.create_task(co.get("x"))
    await asyncio.sleep(0.01)
    first.cancel()
    release.set()
    assert await second == 7
    assert first.cancelled()


async def test_waits_are_bounded() -> None:
    async def fetch(keys: Sequence[str]) -> dict[str, int]:
        await asyncio.sleep(10)
        return {}

    co: Coalescer[str, int] = Coalescer(fetch, timeout=0.05)
    with pytest.raises(TimeoutError):
        await co.get("slow")


async def test_past_the_queue_bound_a_read_goes_alone() -> None:
    release = asyncio.Event()
    calls: list[list[str]] = []

    async def fetch(keys: Sequence[str]) -> dict[str, int]:
        calls.append(list(keys))
        if keys != ["late"]:
            await release.wait()
        return {k: 0 for k in keys}

    co: Coalescer[str, int] = Coalescer(fetch, max_waiting=2)
    queued = [asyncio.create_task(co.get(k)) for k in ("a", "b")]
    await asyncio.sleep(0)
    assert await co.get("late") == 0  # the queue is full: asked on its own, at once
    release.set()
    assert await asyncio.gather(*queued) == [0, 0]
    assert ["late"] in calls


async def test_a_batch_waits_for_company() -> None:
    calls: list[list[str]] = []

    async def fetch(keys: Sequence[str]) -> dict[str, int]:
        calls.append(list(keys))
        return {k: 0 for k in keys}

    co: Coalescer[str, int] = Coalescer(fetch, gather=0.2)
    first = asyncio.create_task(co.get("early"))
    await asyncio.sleep(0.01)  # well within the gathering time
    assert await co.get("late") == 0
    assert await first == 0
    assert calls == [["early", "late"]]
