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
