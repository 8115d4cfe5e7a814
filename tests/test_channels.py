"""``core/channels.py``: channel names, the subscribe rules, automatic channels."""

from __future__ import annotations

import pytest

from revenge_ws.auth import Claims
from revenge_ws.codes import ErrorCode
from revenge_ws.core.channels import ChannelPolicy, Family, automatic_channels, parse_channel
from revenge_ws.exceptions import RequestError

from .core_fixtures import claims


def test_parse_channel() -> None:
    assert parse_channel("activity").family is Family.ACTIVITY
    assert parse_channel("library:l1").key == "l1"
    for bad, code in [
        ("", ErrorCode.INVALID_MESSAGE),
        (5, ErrorCode.INVALID_MESSAGE),
        ("nope:1", ErrorCode.NOT_FOUND),
        ("library", ErrorCode.INVALID_MESSAGE),
        ("library:", ErrorCode.INVALID_MESSAGE),
        ("library:a b", ErrorCode.INVALID_MESSAGE),
        ("activity:x", ErrorCode.INVALID_MESSAGE),
        ("server:1", ErrorCode.INVALID_MESSAGE),
    ]:
        with pytest.raises(RequestError) as info:
            parse_channel(bad)
        assert info.value.code is code, bad


async def test_policy_rules() -> None:
    policy = ChannelPolicy()
    alice, admin = claims(), claims("root", "admin")
    limited = claims("bob", libraries=["l1"])
    allowed = [
        (alice, "notifications:alice"),
        (alice, "user:alice"),
        (alice, "activity"),
        (alice, "library:any"),
        (limited, "library:l1"),
        (admin, "server"),
        (admin, "transcode:j1"),
        (admin, "playback:r1"),
    ]
    denied = [
        (alice, "notifications:bob"),
        (alice, "user:bob"),
        (alice, "server"),
        (limited, "library:l2"),
        (alice, "transcode:j1"),
        (alice, "playback:r1"),
    ]
    for who, name in allowed:
        await policy.check(who, parse_channel(name))
    for who, name in denied:
        with pytest.raises(RequestError) as info:
            await policy.check(who, parse_channel(name))
        assert info.value.code is ErrorCode.FORBIDDEN

    async def owner(c: Claims, key: str) -> bool:
        return key == f"job-of-{c.sub}"

    policy.set_checker(Family.TRANSCODE, owner)
    await policy.check(alice, parse_channel("transcode:job-of-alice"))
    assert automatic_channels(alice) == ["notifications:alice", "user:alice"]
    assert automatic_channels(admin)[-1] == "server"
