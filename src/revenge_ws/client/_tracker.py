"""Per-channel positions, de-duplication and recovery bookkeeping, sans I/O.

The tracker decides, for every publication that arrives, whether the application gets
it: exactly once and in order per channel. It never sends anything itself; the client
asks it what to (re)subscribe and tells it what the server answered.

Rules:

- A channel's *position* is ``(epoch, seq)`` of the last publication delivered to the
  application, or the position the server reported (welcome, ``subscribe`` ack,
  ``subscription.reset``) when nothing was delivered since.
- A publication with ``seq <= position`` in the same epoch is a duplicate: dropped.
  ``seq == position + 1`` is delivered. A larger ``seq`` or another epoch is a gap:
  dropped, and the channel is *recovering* — the client re-subscribes it with
  ``since = position``; the server answers with the missed publications in order
  (or ``recovered: false``). ``transcode:*`` channels keep only the latest value and
  conflate progress, so a gap there is expected and the publication is delivered.
- While a channel recovers, its publications are dropped: everything the server sent
  before the ``subscribe`` ack is at or below the ack's position and is re-sent after
  it, in order.
- ``notification`` messages are de-duplicated by ``data.id`` (contract §5: they are
  re-sent after every connect until acknowledged), never dropped by ``seq``.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..protocol import StreamPosition
from ._wire import is_int

__all__ = ["ChannelState", "Tracker", "Verdict", "latest_only"]

#: Channel families that keep only the latest value (gaps are expected).
LATEST_ONLY_FAMILIES = frozenset({"transcode"})


def latest_only(channel: str) -> bool:
    return channel.partition(":")[0] in LATEST_ONLY_FAMILIES


class Verdict(enum.Enum):
    """What to do with one incoming publication."""

    DELIVER = "deliver"
    #: Already delivered (same epoch, seq at or below the position).
    DUPLICATE = "duplicate"
    #: The channel is recovering; the server sends it again after the ack.
    HELD = "held"
    #: A gap or a new epoch: dropped; start recovering the channel.
    GAP = "gap"
    #: Deliver (a notification, de-duplicated by id) and recover the channel.
    DELIVER_AND_RECOVER = "deliver_and_recover"
    #: The channel is being unsubscribed.
    IGNORED = "ignored"


@dataclass(slots=True)
class ChannelState:
    name: str
    epoch: str | None = None
    seq: int | None = None
    #: Subscribed by the server (welcome, job start, room join), not by the application.
    automatic: bool = False
    #: The application asked for it (``subscribe``).
    wanted: bool = False
    recovering: bool = False
    #: Being unsubscribed: publications are ignored until the ack.
    dropped: bool = False
    #: ``since`` of the subscribe request in flight for this channel.
    sent_since: StreamPosition | None = None
    #: The last ack (or welcome) entry, and on which connection it came.
    entry: dict[str, Any] | None = None
    generation: int = -1

    @property
    def position(self) -> StreamPosition | None:
        if self.epoch is None or self.seq is None:
            return None
        return StreamPosition(self.epoch, self.seq)


class Tracker:
    """Positions and recovery state of every channel one client follows."""

    def __init__(self, notification_ids: int = 10_000) -> None:
        self.channels: dict[str, ChannelState] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_limit = max(1, notification_ids)

    # -- what the application wants ----------------------------------------------------
    def want(self, name: str, since: StreamPosition | None = None) -> ChannelState:
        st = self.channels.get(name)
        if st is None:
            st = self.channels[name] = ChannelState(name)
        st.wanted = True
        st.dropped = False
        if since is not None and st.position is None:
            st.epoch, st.seq = since.epoch, since.seq
        return st

    def drop(self, name: str) -> None:
        """The application unsubscribes: ignore the channel until :meth:`forget`."""
        st = self.channels.get(name)
        if st is not None:
            st.dropped = True
            st.wanted = False

    def forget(self, name: str) -> None:
        self.channels.pop(name, None)

    def acked_in(self, name: str, generation: int) -> bool:
        st = self.channels.get(name)
        return st is not None and not st.dropped and st.generation == generation

    def positions(self) -> dict[str, StreamPosition]:
        return {n: p for n, st in self.channels.items() if (p := st.position) is not None}

    # -- subscribing ---------------------------------------------------------------
    def items_for(self, names: Iterable[str]) -> list[str | dict[str, Any]]:
        """``subscribe`` items for ``names``: with ``since`` when a position is known
        (the channel then recovers until the ack is applied)."""
        items: list[str | dict[str, Any]] = []
        for name in names:
            st = self.channels.get(name)
            if st is None:
                st = self.channels[name] = ChannelState(name, wanted=True)
            pos = st.position
            st.sent_since = pos
            if pos is None:
                items.append(name)
            else:
                st.recovering = True
                items.append({"name": name, "since": {"epoch": pos.epoch, "seq": pos.seq}})
        return items

    def on_welcome(
        self, entries: Iterable[Mapping[str, Any]], generation: int
    ) -> list[str | dict[str, Any]]:
        """Apply a welcome's automatic subscriptions; returns what to (re)subscribe.

        A channel seen for the first time starts at the welcome's position. A known one
        whose position differs (we missed something, or the epoch changed) is
        re-subscribed with ``since``; so is every channel the application subscribed
        and every earlier automatic channel the welcome no longer lists.
        """
        listed: set[str] = set()
        need: list[str] = []
        for e in entries:
            name, epoch, seq = e.get("channel"), e.get("epoch"), e.get("seq")
            if not isinstance(name, str) or not isinstance(epoch, str) or not is_int(seq):
                continue
            listed.add(name)
            st = self.channels.get(name)
            if st is None:
                st = self.channels[name] = ChannelState(name)
            st.automatic = True
            st.dropped = False
            pos = st.position
            if pos is None or (pos.epoch == epoch and pos.seq == seq):
                st.epoch, st.seq = epoch, seq
                st.recovering = False
                st.sent_since = None
                st.entry = dict(e)
                st.generation = generation
            else:
                need.append(name)
        for name, st in list(self.channels.items()):
            if name in listed:
                continue
            if st.dropped:
                del self.channels[name]
                continue
            need.append(name)
        return self.items_for(need)

    def apply_entry(self, entry: Mapping[str, Any], generation: int) -> bool:
        """Apply one ``subscribe`` ack entry; returns False when a requested recovery
        failed (``recovered: false``): the application must reload that channel."""
        name, epoch, seq = entry.get("channel"), entry.get("epoch"), entry.get("seq")
        if not isinstance(name, str):
            return True
        st = self.channels.get(name)
        if st is None:
            st = self.channels[name] = ChannelState(name, wanted=True)
        since, st.sent_since = st.sent_since, None
        st.recovering = False
        st.entry = dict(entry)
        st.generation = generation
        if not isinstance(epoch, str) or not is_int(seq):
            return True
        if since is not None and entry.get("recovered") is True:
            # Missed publications (since.seq + 1 ...) follow the ack, in order.
            st.epoch, st.seq = since.epoch, since.seq
            return True
        st.epoch, st.seq = epoch, seq
        return since is None

    def cancel(self, names: Iterable[str]) -> None:
        """A subscribe request failed as a whole: stop holding these channels."""
        for name in names:
            st = self.channels.get(name)
            if st is not None:
                st.recovering = False
                st.sent_since = None

    def on_reset(self, name: str, epoch: str, seq: int) -> None:
        """``subscription.reset``: the server continues the channel from here."""
        st = self.channels.get(name)
        if st is None:
            st = self.channels[name] = ChannelState(name, automatic=True)
        st.epoch, st.seq = epoch, seq

    # -- incoming ------------------------------------------------------------------
    def on_publication(self, name: str, epoch: str, seq: int) -> Verdict:
        st = self.channels.get(name)
        if st is None:
            # Subscribed by the server after the welcome (a job started, a room joined).
            self.channels[name] = ChannelState(name, epoch, seq, automatic=True)
            return Verdict.DELIVER
        if st.dropped:
            return Verdict.IGNORED
        if st.recovering:
            return Verdict.HELD
        if st.epoch is None or st.seq is None:
            st.epoch, st.seq = epoch, seq
            return Verdict.DELIVER
        if epoch == st.epoch:
            if seq <= st.seq:
                return Verdict.DUPLICATE
            if seq == st.seq + 1 or latest_only(name):
                st.seq = seq
                return Verdict.DELIVER
        st.recovering = True
        return Verdict.GAP

    def on_notification(self, message: Mapping[str, Any]) -> Verdict:
        """A ``notification``: delivered unless its ``data.id`` was seen; its ``seq``
        (when it has one) only moves the channel's position forward."""
        verdict = Verdict.DELIVER
        name, epoch, seq = message.get("channel"), message.get("epoch"), message.get("seq")
        if isinstance(name, str) and isinstance(epoch, str) and is_int(seq):
            st = self.channels.get(name)
            if st is None:
                self.channels[name] = ChannelState(name, epoch, seq, automatic=True)
            elif not st.recovering and not st.dropped and st.seq is not None:
                if epoch == st.epoch and seq == st.seq + 1:
                    st.seq = seq
                elif epoch != st.epoch or seq > st.seq + 1:
                    st.recovering = True
                    verdict = Verdict.DELIVER_AND_RECOVER
        data = message.get("data")
        nid = data.get("id") if isinstance(data, Mapping) else None
        if isinstance(nid, str | int) and not isinstance(nid, bool):
            key = str(nid)
            if key in self._seen:
                self._seen.move_to_end(key)
                return Verdict.GAP if verdict is Verdict.DELIVER_AND_RECOVER else Verdict.DUPLICATE
            self._seen[key] = None
            if len(self._seen) > self._seen_limit:
                self._seen.popitem(last=False)
        return verdict
