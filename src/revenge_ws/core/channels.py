"""Channel names, families and who may subscribe to what (contract §3).

The policy is data plus small async checkers: families whose rule needs state the core
does not own (a transcode job's owner, a SyncPlay room's members) get a checker from the
feature that owns that state.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

from ..auth import Claims
from ..codes import ErrorCode
from ..exceptions import RequestError

__all__ = [
    "LINGER",
    "ChannelPolicy",
    "Family",
    "automatic_channels",
    "is_personal",
    "lingers",
    "parse_channel",
]


class Family(StrEnum):
    NOTIFICATIONS = "notifications"
    USER = "user"
    SERVER = "server"
    LIBRARY = "library"
    TRANSCODE = "transcode"
    PLAYBACK = "playback"
    ACTIVITY = "activity"
    #: Every device's "now playing", for admins (contract v1.1 §13).
    SESSIONS = "sessions"


_KEYED = frozenset(
    {Family.NOTIFICATIONS, Family.USER, Family.LIBRARY, Family.TRANSCODE, Family.PLAYBACK}
)
_KEY = re.compile(r"[A-Za-z0-9_.@=+~-]{1,128}")
#: Families whose channels keep the latest value (given in the subscribe ack) and whose
#: progress updates are conflated for slow readers.
LATEST_VALUE = frozenset({Family.TRANSCODE})
#: Families whose publications may linger in outboxes during a reconnect storm
#: (``server.storm_linger``): shared by many users, read by people, not timed. SyncPlay
#: (``playback``) is timed; a user's own channels carry few messages, acknowledged ones.
LINGER = frozenset(
    {Family.ACTIVITY, Family.LIBRARY, Family.SERVER, Family.SESSIONS, Family.TRANSCODE}
)
#: A user's own channels: every connection of the user is on them, so their presence is
#: the user's connection count (kept by the broker anyway) and needs no entry per
#: connection (two broker writes per connect and per close, and memory, saved).
PERSONAL = frozenset({Family.NOTIFICATIONS, Family.USER})
_PERSONAL_PREFIXES = tuple(f"{f}:" for f in PERSONAL)


def is_personal(name: str) -> bool:
    """True for ``notifications:<user>`` and ``user:<user>``."""
    return name.startswith(_PERSONAL_PREFIXES)


def lingers(name: str) -> bool:
    """True for a channel of a :data:`LINGER` family (``activity``, ``library:<id>``...)."""
    return name.partition(":")[0] in LINGER


#: Publication types that a newer one of the same channel may replace in a slow queue.
CONFLATABLE_TYPES = frozenset({"transcode.progress"})


@dataclass(frozen=True, slots=True)
class Channel:
    name: str
    family: Family
    key: str | None


def parse_channel(name: object) -> Channel:
    """Validate a channel name; ``INVALID_MESSAGE`` for a malformed one,
    ``NOT_FOUND`` for an unknown family."""
    if not isinstance(name, str) or not name or len(name) > 160:
        raise RequestError(ErrorCode.INVALID_MESSAGE, "a channel name must be a short string")
    fam, sep, key = name.partition(":")
    try:
        family = Family(fam)
    except ValueError:
        raise RequestError(ErrorCode.NOT_FOUND, f"no channel family {fam!r}") from None
    if family in _KEYED:
        if not sep or not _KEY.fullmatch(key):
            raise RequestError(
                ErrorCode.INVALID_MESSAGE,
                f"channel {family}:<id> needs an id of [A-Za-z0-9_.@=+~-]",
            )
        return Channel(name, family, key)
    if sep:
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"channel {family!s} takes no id")
    return Channel(name, family, None)


def automatic_channels(claims: Claims) -> list[str]:
    """Channels every connection of this user is subscribed to on connect."""
    chans = [f"notifications:{claims.sub}", f"user:{claims.sub}"]
    if claims.is_admin:
        chans.append("server")
    return chans


Checker = Callable[[Claims, str], Awaitable[bool]]


async def _never(claims: Claims, key: str) -> bool:
    return False


class ChannelPolicy:
    """Decides whether a user may subscribe to a channel."""

    def __init__(self) -> None:
        self._checkers: dict[Family, Checker] = {
            # Owner recorded on the job's first event; features replace these.
            Family.TRANSCODE: _never,
            # Only members, and membership comes from syncplay.join.
            Family.PLAYBACK: _never,
        }

    def set_checker(self, family: Family, checker: Checker) -> None:
        self._checkers[family] = checker

    async def check(self, claims: Claims, channel: Channel) -> None:
        """Raise ``RequestError(FORBIDDEN)`` unless ``claims`` may subscribe."""
        fam = channel.family
        allowed: bool
        if fam in (Family.NOTIFICATIONS, Family.USER):
            allowed = channel.key == claims.sub
        elif fam in (Family.SERVER, Family.SESSIONS):
            allowed = claims.is_admin
        elif fam is Family.LIBRARY:
            allowed = claims.may_see_library(channel.key or "")
        elif fam is Family.ACTIVITY:
            allowed = True
        else:
            allowed = claims.is_admin or await self._checkers[fam](claims, channel.key or "")
        if not allowed:
            raise RequestError(ErrorCode.FORBIDDEN, f"not allowed to subscribe to {channel.name}")
