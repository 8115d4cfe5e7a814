"""``core/ratelimit.py``: the token bucket."""

from __future__ import annotations

import pytest

from revenge_ws.core.ratelimit import TokenBucket


def test_token_bucket_refills_and_caps() -> None:
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.retry_after() == pytest.approx(0.1)
    assert b.take(0.1)
    assert not b.take(0.1)
    assert b.take(100.0) and b.take(100.0) and b.take(100.0) and not b.take(100.0)


def test_token_bucket_wait_looks_without_spending() -> None:
    b = TokenBucket(rate=2.0, burst=2, now=0.0)
    assert b.wait(0.0) == 0.0
    assert b.take(0.0) and b.take(0.0)
    assert b.wait(0.0) == 0.5
    assert b.wait(0.25) == 0.25
    assert b.wait(0.25) == 0.25  # looking twice spends nothing
    assert b.wait(10.0) == 0.0
    assert b.take(0.5) and not b.take(0.5)
