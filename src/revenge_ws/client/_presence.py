"""Who is online, from the ``activity.presence`` publications (contract §11).

The hub publishes one coalesced ``activity.presence`` on the ``activity`` channel at most
once per window (1 s), with the net changes since the previous one; a user goes offline
only after their last connection has been closed for the grace (10 s). There is no
snapshot: a tracker knows the users whose changes it has seen since it started.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NotRequired, TypedDict

__all__ = ["OnlineUsers", "PresenceData", "PresenceUser", "parse_presence"]

#: The publication's type.
PRESENCE = "activity.presence"


class PresenceUser(TypedDict):
    user_id: str
    #: The token's ``name`` claim, else the user id.
    name: str


class PresenceCounts(TypedDict):
    online: int
    offline: int


class PresenceData(TypedDict):
    """The ``data`` of ``activity.presence``: who came online and who went offline since
    the previous one (a user is in at most one of the lists). ``more``, when present,
    counts the users a large batch left out of the lists (the hub names at most
    ``activity.presence_max_users`` per list)."""

    online: list[PresenceUser]
    offline: list[PresenceUser]
    more: NotRequired[PresenceCounts]


def _users(value: object) -> list[PresenceUser]:
    if not isinstance(value, list):
        return []
    out: list[PresenceUser] = []
    for entry in value:
        if isinstance(entry, Mapping) and isinstance(entry.get("user_id"), str):
            name = entry.get("name")
            uid = entry["user_id"]
            out.append({"user_id": uid, "name": name if isinstance(name, str) else uid})
    return out


def parse_presence(message: Mapping[str, Any]) -> PresenceData | None:
    """The data of an ``activity.presence`` message, with malformed entries dropped;
    None for any other message."""
    if message.get("type") != PRESENCE:
        return None
    data = message.get("data")
    if not isinstance(data, Mapping):
        return None
    change: PresenceData = {
        "online": _users(data.get("online")),
        "offline": _users(data.get("offline")),
    }
    more = data.get("more")
    if isinstance(more, Mapping):
        counts = [more.get("online"), more.get("offline")]
        if all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
            change["more"] = {"online": int(more["online"]), "offline": int(more["offline"])}
    return change


class OnlineUsers:
    """The users currently online, kept from ``activity.presence`` messages.

    ::

        online = OnlineUsers()
        client.on("activity.presence", online.apply)
        await client.subscribe("activity")

    Pure: no I/O, no clock. ``apply`` ignores other messages, so it may also be fed
    every message of :meth:`Client.messages`.
    """

    __slots__ = ("_users",)

    def __init__(self) -> None:
        self._users: dict[str, str] = {}

    def apply(self, message: Mapping[str, Any]) -> None:
        change = parse_presence(message)
        if change is None:
            return
        # The hub names a user in one list at most; were both to name one, the user
        # stays listed (offline first), as a dropped entry would not come back.
        for user in change["offline"]:
            self._users.pop(user["user_id"], None)
        for user in change["online"]:
            self._users[user["user_id"]] = user["name"]

    @property
    def users(self) -> dict[str, str]:
        """``user_id -> name`` of every user online, in the order they came online."""
        return dict(self._users)

    def clear(self) -> None:
        self._users.clear()

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._users

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._users))

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"OnlineUsers({sorted(self._users)!r})"
