"""Presence changes coalesced into one publication per window (contract v1.1 §11).

:class:`PresenceCoalescer` is pure: it never reads a clock (every method takes ``now``)
and never does I/O. The ``activity`` feature drives it: it feeds a user's first
connection cluster-wide (:meth:`~PresenceCoalescer.online`) and their last close
(:meth:`~PresenceCoalescer.offline`), confirms or cancels offline users whose grace ended
after asking the broker (:meth:`~PresenceCoalescer.due` →
:meth:`~PresenceCoalescer.confirm_offline` / :meth:`~PresenceCoalescer.cancel_offline`),
and publishes what :meth:`~PresenceCoalescer.flush` returns.

Rules:

* A batch opens at its first change and is published ``window`` seconds later, with the
  net changes since the last publication: a user who came and went within it is in
  neither list, and so is one who went and came back. So N users arriving within T
  seconds cost at most T / window + 1 publications, not N.
* A publication names at most ``max_users`` users each way (the driver's setting): a
  batch larger than that (a restart of a node with thousands of users) is published with
  the users it names and ``more``: how many it leaves out. Every subscriber receives every
  publication, so listing N users to N subscribers would cost N² bytes.
* A user's last close starts a grace of ``grace`` seconds. Coming back (anywhere: the
  driver confirms with the cluster-wide count) cancels it, so a restart or a reconnect
  never reports anyone offline; only a confirmed absence enters the batch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

__all__ = ["PresenceChange", "PresenceCoalescer"]


@dataclass(frozen=True, slots=True)
class PresenceChange:
    """One publication's worth of net changes: ``{user_id: name}`` each way."""

    online: dict[str, str]
    offline: dict[str, str]

    def data(self, max_users: int | None = None) -> dict[str, Any]:
        """The ``activity.presence`` payload; each list holds at most ``max_users`` users,
        and ``more`` counts those left out (only when some were)."""
        lists = {
            key: [{"user_id": u, "name": n} for u, n in changes.items()][:max_users]
            for key, changes in (("online", self.online), ("offline", self.offline))
        }
        left = {
            "online": len(self.online) - len(lists["online"]),
            "offline": len(self.offline) - len(lists["offline"]),
        }
        out: dict[str, Any] = dict(lists)
        if left["online"] or left["offline"]:
            out["more"] = left
        return out


class PresenceCoalescer:
    """Net online/offline changes, published at most once per ``window`` seconds.

    Memory is bounded by the users whose state changed within the last window plus those
    in their grace: each user is in at most one of the three maps at a time.
    """

    def __init__(self, window: float, grace: float) -> None:
        if window <= 0 or grace < 0:
            raise ValueError("need window > 0 and grace >= 0")
        self.window = window
        self.grace = grace
        #: Reported online in the open batch: user -> (name, when they came).
        self._online: dict[str, tuple[str, float]] = {}
        #: Confirmed offline in the open batch: user -> name.
        self._offline: dict[str, str] = {}
        #: In their grace: user -> (name, deadline). The heap orders the deadlines; an
        #: entry whose deadline no longer matches the map is stale and skipped.
        self._grace: dict[str, tuple[str, float]] = {}
        self._deadlines: list[tuple[float, str]] = []
        #: When the open batch is due (None: no batch open).
        self._due: float | None = None

    # -- input -----------------------------------------------------------------------
    def online(self, user_id: str, name: str, now: float) -> None:
        """``user_id`` opened their first connection cluster-wide."""
        if self._grace.pop(user_id, None) is not None:
            return  # back within the grace: never reported offline, nothing to say
        if self._offline.pop(user_id, None) is not None:
            return  # went and came back within the batch: in neither list
        self._online[user_id] = (name, now)
        self._open(now)

    def offline(self, user_id: str, name: str, now: float) -> float:
        """``user_id``'s last connection cluster-wide closed; returns the grace deadline."""
        deadline = now + self.grace
        self._grace[user_id] = (name, deadline)
        heapq.heappush(self._deadlines, (deadline, user_id))
        return deadline

    def due(self, now: float) -> list[tuple[str, float]]:
        """Users whose grace ended by ``now``, with their deadlines: the driver checks
        each against the cluster and answers :meth:`confirm_offline` or
        :meth:`cancel_offline`. Until then they stay in their grace."""
        out: list[tuple[str, float]] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, user = heapq.heappop(heap)
            entry = self._grace.get(user)
            if entry is not None and entry[1] == deadline:
                out.append((user, deadline))
        return out

    def requeue(self, items: list[tuple[str, float]]) -> None:
        """Give back users from :meth:`due` that could not be checked (broker down):
        they are due again at once."""
        for user, deadline in items:
            heapq.heappush(self._deadlines, (deadline, user))

    def confirm_offline(self, user_id: str, deadline: float, now: float) -> None:
        """The user still had no connection when their grace (ending ``deadline``) ran
        out. Ignored when they came back meanwhile or a later close restarted it."""
        entry = self._grace.get(user_id)
        if entry is None or entry[1] != deadline:
            return
        del self._grace[user_id]
        if self._online.pop(user_id, None) is not None:
            return  # came and went within the batch: in neither list
        self._offline[user_id] = entry[0]
        self._open(now)

    def cancel_offline(self, user_id: str, deadline: float) -> None:
        """The user is connected somewhere (another node): no offline report."""
        entry = self._grace.get(user_id)
        if entry is not None and entry[1] == deadline:
            del self._grace[user_id]

    def suppress_online(self, user_id: str) -> None:
        """Drop ``user_id`` from the open batch's online list (another node still had
        them in their grace, so for everyone else they never left)."""
        self._online.pop(user_id, None)

    # -- output ----------------------------------------------------------------------
    def online_since(self) -> dict[str, float]:
        """The open batch's online users and when each came (for :meth:`suppress_online`)."""
        return {u: t for u, (_, t) in self._online.items()}

    def next_wakeup(self) -> float | None:
        """When the driver has something to do: the batch is due or a grace ends."""
        grace = self._deadlines[0][0] if self._deadlines else None
        if self._due is None or grace is None:
            return self._due if grace is None else grace
        return min(self._due, grace)

    def flush_due(self, now: float) -> bool:
        return self._due is not None and now >= self._due

    def flush(self, now: float, *, force: bool = False) -> PresenceChange | None:
        """The open batch if it is due (or ``force``), and a new empty one; else None.

        A batch whose changes cancelled out is closed without a publication."""
        if self._due is None or (now < self._due and not force):
            return None
        change = PresenceChange(
            online={u: n for u, (n, _) in self._online.items()}, offline=dict(self._offline)
        )
        self._online.clear()
        self._offline.clear()
        self._due = None
        return change if change.online or change.offline else None

    def drop_graces(self) -> int:
        """Forget every grace (the node stops: a restart must not report anyone offline)."""
        n = len(self._grace)
        self._grace.clear()
        self._deadlines.clear()
        return n

    @property
    def in_grace(self) -> int:
        return len(self._grace)

    # -- internals ---------------------------------------------------------------------
    def _open(self, now: float) -> None:
        if self._due is None:
            self._due = now + self.window
