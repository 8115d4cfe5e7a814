"""The clients of the storm benchmark: one load process (``python -m bench.load``, mode
``storm``) holding a few thousand users, each behaving like a real app.

A user (token ``sub`` = ``s<index>``) connects, takes the positions of its automatic
channels (``notifications:{uid}``, ``user:{uid}``) from the ``welcome`` and subscribes to
``activity``, ``library:l1`` and ``library:l2``. When its connection ends it reconnects
with the policy of the shipped Python client (``revenge_ws.client.reconnect_delay``, fed
the close code, the window the close reason advises, and for a refused handshake its
status, ``Retry-After`` and ``Reconnect-Window``), then subscribes all five channels with
``since`` = the last position it saw on each. It is *back* when that ack arrives.

Every publication is checked: per channel and epoch, ``seq`` goes up by exactly one; an
ack entry ``recovered: true`` must say ``seq == since.seq + missed`` and be followed by
exactly those publications (the same contiguity check); ``recovered: false`` is counted
per channel family (expected with the memory broker, a failure with Redis: the
orchestrator decides). Notifications re-sent after the ``welcome`` (direct messages, no
``seq``) are counted and acknowledged with ``notification.ack`` in one batch, as an app
does once it has shown them.

Orchestrator commands (stdin) and answers (stdout, see ``bench.load``): ``connect`` →
``READY``; ``subscribe`` → ``SUBSCRIBED``; ``arm {json}`` → ``ARMED`` (every user caught up
with the given positions, then watching its connection); ``BACK`` comes by itself once
every user whose connection ended is back (or gave up); ``check {json}`` → ``R`` (every
user reached the final positions, or is reported behind); ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter
from typing import Any

import orjson

from .common import HOST
from .wsclient import HandshakeRefused, Stats, WSClient, build_request

__all__ = [
    "LIBRARIES",
    "ClosedEarly",
    "StormConn",
    "StormRefused",
    "User",
    "notified",
    "open_conn",
    "run",
]

LIBRARIES = ("library:l1", "library:l2")
SUBSCRIBED = ("activity", *LIBRARIES)
_RETRY = re.compile(rb"(?im)^retry-after:\s*([0-9.]+)")
_WINDOW = re.compile(rb"(?im)^reconnect-window:\s*([0-9.]+)")
_PUB = re.compile(
    rb'\{"type":"([^"\\]*)","channel":"([^"\\]*)","seq":(\d+),"epoch":"([^"\\]*)"'
).match


def notified(index: int, every: int) -> bool:
    """One user in ``every`` gets notifications: in each block of ``every`` users a
    different offset in alternate blocks, so that they are not all of one parity (a
    round-robin balancer puts odd and even connections on different nodes)."""
    return every > 0 and index % every == (index // every) % 2


def family(channel: str) -> str:
    return channel.split(":", 1)[0]


class StormRefused(HandshakeRefused):
    """A refused handshake with the spread window its ``Reconnect-Window`` advises."""

    def __init__(self, status: int, retry_after: float | None, window: float | None) -> None:
        super().__init__(status, retry_after)
        self.window = window


class ClosedEarly(ConnectionError):
    """The server closed the WebSocket before the ``welcome`` (code, reason)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed with {code} before the welcome")
        self.code = code
        self.reason = reason


class User:
    """One user's state across its connections: positions and what was checked."""

    def __init__(
        self,
        index: int,
        token: str,
        notify: bool,
        *,
        uid: str | None = None,
        channels: tuple[str, ...] = SUBSCRIBED,
        automatic: bool = True,
    ) -> None:
        self.index = index
        self.uid = uid or f"s{index}"
        self.token = token
        self.notify = notify
        self.channels = channels
        self.automatic: tuple[str, ...] = (
            (f"notifications:{self.uid}", f"user:{self.uid}") if automatic else ()
        )
        #: channel -> [epoch, seq] of the last publication seen (or the ack's position).
        self.pos: dict[str, list[Any]] = {}
        self.conn: StormConn | None = None
        self.node: str | None = None
        self.welcome_window: float | None = None
        self.checks: Counter[str] = Counter()
        self.unrecovered: Counter[str] = Counter()
        self.notes_live = 0
        self.resent: set[str] = set()
        self.resent_count = 0
        self.acked_notes: set[str] = set()
        self.mover = False
        self.closed_at = 0.0
        self.back_at = 0.0
        #: Of the attempt that brought the user back: connect → welcome, welcome → ack;
        #: and the seconds it waited (policy delays) since its connection ended.
        self.handshake_s = 0.0
        self.subscribe_s = 0.0
        self.waited_s = 0.0
        self.gave_up = ""
        #: Called with (receive time, publication) for every publication (the observer).
        self.record: Any = None

    def publication(self, ch: str, epoch: str, seq: int, note: bool, conn: StormConn) -> None:
        if conn.early is not None and ch in conn.early:
            # An automatic channel is live from the welcome on, before its resubscribe
            # with since is acked: skipped (the recovery that follows is checked).
            self.checks["live before the resubscribe ack"] += 1
            return
        if note:
            self.notes_live += 1
        st = self.pos.get(ch)
        if st is None:
            self.checks["publication on an unknown channel"] += 1
            self.pos[ch] = [epoch, seq]
            return
        if epoch != st[0]:
            self.checks["gap: epoch changed without an ack"] += 1
            self.pos[ch] = [epoch, seq]
            return
        if seq == st[1] + 1:
            st[1] = seq
        elif seq <= st[1]:
            self.checks["duplicate"] += 1
        else:
            self.checks["gap"] += 1
            self.checks["gap: missing publications"] += seq - st[1] - 1
            st[1] = seq

    def subscribed(self, data: dict[str, Any], since: dict[str, list[Any] | None]) -> None:
        for entry in data.get("subscriptions") or []:
            ch = entry.get("channel")
            s = since.get(ch)
            if s is None:
                self.pos[ch] = [entry.get("epoch"), entry.get("seq", 0)]
                continue
            if entry.get("recovered"):
                self.checks["recovered"] += 1
                self.checks["missed (replayed)"] += int(entry.get("missed") or 0)
                if entry.get("epoch") != s[0] or entry.get("seq") != s[1] + int(
                    entry.get("missed") or 0
                ):
                    self.checks["gap: recovered entry does not add up"] += 1
                self.pos[ch] = [s[0], s[1]]
            else:
                self.unrecovered[family(ch)] += 1
                self.pos[ch] = [entry.get("epoch"), entry.get("seq", 0)]
        for err in data.get("errors") or []:
            self.checks[f"subscribe error {err.get('code')}"] += 1

    def resubscribe(self) -> tuple[bytes, dict[str, list[Any] | None]]:
        """The resubscribe of every channel with ``since`` (the last position seen)."""
        since: dict[str, list[Any] | None] = {}
        items: list[Any] = []
        for ch in (*self.automatic, *self.channels):
            p = self.pos.get(ch)
            if p is None or p[0] is None:
                since[ch] = None
                items.append(ch)
            else:
                since[ch] = [p[0], p[1]]
                items.append({"name": ch, "since": {"epoch": p[0], "seq": p[1]}})
        msg = {"type": "subscribe", "id": "s1", "data": {"channels": items}}
        return orjson.dumps(msg), since


class StormConn(WSClient):
    """One connection of a :class:`User`: ready at the ``welcome``; ``ack_fut`` resolves
    with the ``subscribe`` ack (sent at the welcome when ``on_welcome`` is given)."""

    def __init__(
        self,
        user: User,
        request: bytes,
        stats: Stats,
        *,
        on_welcome: tuple[bytes, dict[str, list[Any] | None]] | None = None,
        first: bool = False,
    ) -> None:
        super().__init__("hub", request, stats, track=True)
        self.user = user
        self.first = first
        self.on_welcome = on_welcome
        self.since: dict[str, list[Any] | None] = {}
        self.ack_fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.early: set[str] | None = None
        self.node: str | None = None
        self._notes: list[str] = []
        self._note_timer: asyncio.TimerHandle | None = None
        self._note_req = 0
        #: notification.ack requests in flight: id -> (ids, tries).
        self._note_sent: dict[str, tuple[list[str], int]] = {}

    def _handshake(self, head: bytes) -> None:
        status = int(head[9:12]) if head[:9] == b"HTTP/1.1 " and head[9:12].isdigit() else 0
        if status == 101:
            self.upgraded = True
            return
        ra = _RETRY.search(head)
        rw = _WINDOW.search(head)
        self._fail(
            StormRefused(
                status, float(ra.group(1)) if ra else None, float(rw.group(1)) if rw else None
            )
        )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.ack_fut.done():
            self.ack_fut.set_exception(ConnectionError(f"closed before the ack ({exc})"))
            self.ack_fut.exception()
        if self._note_timer is not None:
            self._note_timer.cancel()

    def send_subscribe(self, payload: bytes, since: dict[str, list[Any] | None]) -> None:
        self.since = since
        self.early = {ch for ch, s in since.items() if s is not None} & set(self.user.automatic)
        self.send_text(payload)

    def _text(self, p: bytes) -> None:
        # Publications are most of the traffic: their position is read from the start of
        # the hub's envelope (type, channel, seq, epoch in this order), no full decode.
        m = _PUB(p)
        if m is not None and self.user.record is None:
            mtype, ch, seq, epoch = m.groups()
            self.user.publication(
                ch.decode(), epoch.decode(), int(seq), mtype == b"notification", self
            )
            return
        msg = orjson.loads(p)
        u = self.user
        if "seq" in msg:
            ch = msg.get("channel")
            if not isinstance(ch, str):
                u.checks["publication without channel"] += 1
                return
            if u.record is not None:
                u.record(time.time(), msg)
            u.publication(
                ch, msg.get("epoch"), msg.get("seq"), msg.get("type") == "notification", self
            )
            return
        mtype = msg.get("type")
        if mtype == "welcome":
            data = msg.get("data") or {}
            self.node = data.get("node_id")
            w = data.get("restart_window")
            rc = data.get("reconnect")
            if w is None and isinstance(rc, dict):
                w = rc.get("restart_window")
            u.welcome_window = float(w) if isinstance(w, int | float) else None
            if self.first:
                for e in data.get("subscriptions") or []:
                    u.pos[e["channel"]] = [e.get("epoch"), e.get("seq", 0)]
            if self.on_welcome is not None:
                self.send_subscribe(*self.on_welcome)
            self._set_ready()
        elif mtype == "ack":
            rid = msg.get("id")
            if rid == "s1":
                data = msg.get("data") or {}
                u.subscribed(data, self.since)
                self.early = None
                if not self.ack_fut.done():
                    self.ack_fut.set_result(data)
            elif isinstance(rid, str) and rid.startswith("n"):
                self._note_sent.pop(rid, None)
                u.acked_notes.update((msg.get("data") or {}).get("ids") or [])
        elif mtype == "notification":
            nid = (msg.get("data") or {}).get("id")
            u.resent_count += 1
            if isinstance(nid, str) and nid not in u.resent:
                u.resent.add(nid)
                self._notes.append(nid)
                if self._note_timer is None:
                    # Shown, then acknowledged together: one notification.ack per batch.
                    loop = asyncio.get_running_loop()
                    self._note_timer = loop.call_later(0.05, self._ack_notes)
        elif mtype == "error":
            data = msg.get("data") or {}
            code, rid = data.get("code"), msg.get("id")
            sent = self._note_sent.pop(rid, None) if isinstance(rid, str) else None
            u.checks[f"error {code} ({'notification.ack' if sent else rid})"] += 1
            if sent is not None and data.get("retryable") and sent[1] < 3:
                # As an app does with a retryable error: try again a little later.
                u.checks["notification.ack retried"] += 1
                asyncio.get_running_loop().call_later(
                    0.5 * (sent[1] + 1), self._send_note_ack, sent[0], sent[1] + 1
                )
            if rid == "s1" and not self.ack_fut.done():
                self.ack_fut.set_exception(ConnectionError(f"subscribe refused: {code}"))
                self.ack_fut.exception()
        elif mtype == "subscription.reset":
            u.checks["gap: subscription.reset"] += 1
            data = msg.get("data") or {}
            if data.get("channel"):
                u.pos[data["channel"]] = [data.get("epoch"), data.get("seq", 0)]

    def _ack_notes(self) -> None:
        self._note_timer = None
        ids, self._notes = self._notes, []
        if ids:
            self._send_note_ack(ids, 0)

    def _send_note_ack(self, ids: list[str], tries: int) -> None:
        if self.closed_fut.done():
            return  # re-sent on the next connection, acknowledged there
        self._note_req += 1
        rid = f"n{self._note_req}"
        self._note_sent[rid] = (ids, tries)
        self.send_text(orjson.dumps({"type": "notification.ack", "id": rid, "data": {"ids": ids}}))


async def open_conn(
    port: int,
    user: User,
    stats: Stats,
    *,
    on_welcome: tuple[bytes, dict[str, list[Any] | None]] | None = None,
    first: bool = False,
    timeout: float = 10.0,
) -> StormConn:
    """TCP, upgrade and ``welcome`` within ``timeout``; raises StormRefused, OSError,
    ConnectionError or TimeoutError (the socket is dropped on failure)."""
    loop = asyncio.get_running_loop()
    request = build_request("hub", port, user.token)
    transport, proto = await asyncio.wait_for(
        loop.create_connection(
            lambda: StormConn(user, request, stats, on_welcome=on_welcome, first=first),
            HOST,
            port,
        ),
        timeout,
    )
    try:
        await asyncio.wait_for(proto.ready_fut, timeout)
    except ConnectionError as exc:
        transport.abort()
        if proto.close_code is not None:
            raise ClosedEarly(proto.close_code, proto.close_reason) from exc
        raise
    except BaseException:
        transport.abort()
        raise
    return proto


# -- the load process ------------------------------------------------------------------
def _tokens(n: int, offset: int) -> list[str]:
    from revenge_ws.auth import mint_token
    from revenge_ws.config import JwtSettings

    from .common import SECRET

    settings = JwtSettings(secret=SECRET)  # type: ignore[arg-type]
    return [mint_token(settings, f"s{offset + i}", ttl=7200) for i in range(n)]


class Storm:
    def __init__(self, cfg: dict[str, Any]) -> None:
        from revenge_ws.client import ReconnectPolicy

        self.cfg = cfg
        self.port: int = cfg["port"]
        self.n: int = cfg["n"]
        self.offset: int = cfg.get("offset", 0)
        self.stats = Stats()
        self.policy = ReconnectPolicy()
        self.rng = random.Random(self.offset + 1)
        every = int(cfg.get("notify_every", 10))
        self.users = [
            User(self.offset + i, tok, notified(self.offset + i, every))
            for i, tok in enumerate(_tokens(self.n, self.offset))
        ]
        self.outcomes: Counter[str] = Counter()
        self.attempts = 0
        self.deadline = 0.0
        self.tasks: list[asyncio.Task[None]] = []
        #: Seconds a handshake may take up to the welcome, and the subscribe ack after
        #: it (the Python client's connect_timeout and request_timeout).
        self.connect_timeout = float(cfg.get("connect_timeout_s", 10.0))
        self.request_timeout = float(cfg.get("request_timeout_s", 5.0))

    async def bounded(self, coros: list[Any], concurrency: int) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(c: Any) -> None:
            async with sem:
                await c

        await asyncio.gather(*(one(c) for c in coros))

    async def connect_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout

        async def one(u: User) -> None:
            while time.monotonic() < deadline:
                try:
                    u.conn = await open_conn(self.port, u, self.stats, first=True)
                    u.node = u.conn.node
                    return
                except HandshakeRefused as exc:
                    self.outcomes[f"setup: http {exc.status}"] += 1
                    await asyncio.sleep(min(exc.retry_after or 0.2, 1.0) * random.random())
                except (OSError, TimeoutError, ConnectionError) as exc:
                    self.outcomes[f"setup: {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.05 + 0.2 * random.random())

        await self.bounded([one(u) for u in self.users], int(self.cfg.get("concurrency", 64)))

    async def subscribe_all(self, timeout: float) -> int:
        msg = orjson.dumps({"type": "subscribe", "id": "s1", "data": {"channels": SUBSCRIBED}})

        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(int(self.cfg.get("concurrency", 64)))
        end = time.monotonic() + timeout

        async def one(u: User) -> bool:
            c = u.conn
            if c is None:
                return False
            async with sem:  # like the connects: the set-up is not what is measured
                for attempt in range(4):
                    if attempt:
                        await asyncio.sleep(0.5 * attempt)
                        c.ack_fut = loop.create_future()
                    c.send_subscribe(msg, dict.fromkeys(SUBSCRIBED))
                    left = max(0.1, min(30.0, end - time.monotonic()))
                    with contextlib.suppress(TimeoutError, ConnectionError):
                        await asyncio.wait_for(asyncio.shield(c.ack_fut), left)
                        return True
                    self.outcomes["setup: subscribe failed, retried"] += 1
                    if c.closed_fut.done() or time.monotonic() >= end:
                        return False
            return False

        done = await asyncio.gather(*(one(u) for u in self.users))
        return sum(done)

    def behind(self, positions: dict[str, list[Any]], notes: int) -> int:
        late = 0
        for u in self.users:
            if u.gave_up:
                continue
            if u.conn is None:
                late += 1
                continue
            for ch, (epoch, seq) in positions.items():
                p = u.pos.get(ch)
                if p is None or p[0] != epoch or p[1] < seq:
                    late += 1
                    break
            else:
                if u.notify and u.notes_live < notes:
                    late += 1
        return late

    async def wait_caught_up(
        self, positions: dict[str, list[Any]], notes: int, timeout: float
    ) -> int:
        end = time.monotonic() + timeout
        while (late := self.behind(positions, notes)) and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return late

    # -- the storm ---------------------------------------------------------------------
    async def survive(self, u: User) -> None:
        """Watch the user's connection; whenever it ends, come back as the app would."""
        from revenge_ws.client import advised_window, reconnect_delay

        while True:
            c = u.conn
            assert c is not None
            left = self.deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(c.closed_fut), left)
            if not c.closed_fut.done():
                return
            if not u.closed_at:
                u.closed_at = time.time()
            else:
                self.outcomes["closed again after being back"] += 1
            code, reason = c.close_code, c.close_reason
            self.outcomes[f"close {code or 1006}"] += 1
            window = advised_window(reason, self.policy.max_window)
            if window is not None:
                self.outcomes["close reason advised a window"] += 1
            elif code in (1001, 1012):
                window = u.welcome_window
            attempt = 0
            waited = 0.0
            delay = reconnect_delay(self.policy, attempt, self.rng, code=code, window=window)
            attempt += 1
            while True:
                if time.monotonic() + delay >= self.deadline:
                    u.gave_up = "not back at the deadline"
                    return
                await asyncio.sleep(delay)
                waited += delay
                self.attempts += 1
                sub = u.resubscribe()
                nc: StormConn | None = None
                t_try = time.monotonic()
                try:
                    nc = await open_conn(
                        self.port, u, self.stats, on_welcome=sub, timeout=self.connect_timeout
                    )
                    t_welcome = time.monotonic()
                    await asyncio.wait_for(asyncio.shield(nc.ack_fut), self.request_timeout)
                except StormRefused as exc:
                    self.outcomes[f"http {exc.status}"] += 1
                    if exc.window is not None:
                        self.outcomes[f"http {exc.status} with Reconnect-Window"] += 1
                    if exc.status not in (429, 503):
                        u.gave_up = f"refused with HTTP {exc.status}"
                        return
                    delay = reconnect_delay(
                        self.policy,
                        attempt,
                        self.rng,
                        http_status=exc.status,
                        retry_after=exc.retry_after,
                        window=exc.window,
                    )
                    attempt += 1
                    continue
                except (OSError, TimeoutError, ConnectionError) as exc:
                    stage = "before the welcome" if nc is None else "before the ack"
                    self.outcomes[f"{type(exc).__name__} {stage}"] += 1
                    code, w = None, None
                    if isinstance(exc, ClosedEarly):  # a close frame: its code and window
                        code = exc.code
                        w = advised_window(exc.reason, self.policy.max_window)
                    elif nc is not None:
                        code = nc.close_code
                        if nc.transport is not None:
                            nc.transport.abort()
                        w = advised_window(nc.close_reason, self.policy.max_window)
                    if isinstance(exc, ClosedEarly) or (nc is not None and code is not None):
                        self.outcomes[f"closed with {code} before being back"] += 1
                    delay = reconnect_delay(self.policy, attempt, self.rng, code=code, window=w)
                    attempt += 1
                    continue
                u.conn = nc
                u.node = nc.node
                if not u.back_at:
                    u.back_at = time.time()
                    u.handshake_s = t_welcome - t_try
                    u.subscribe_s = time.monotonic() - t_welcome
                    u.waited_s = waited
                break

    def closed_users(self) -> list[User]:
        return [u for u in self.users if u.closed_at]

    def settled(self) -> bool:
        for u in self.users:
            if u.mover and not u.closed_at and not u.gave_up:
                return False
            if u.closed_at and not u.back_at and not u.gave_up:
                return False
        return True

    def back_report(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "movers": sum(1 for u in self.users if u.mover),
            "closed": len(self.closed_users()),
            "back": [round(u.back_at, 4) for u in self.users if u.back_at],
            "handshake_s": [round(u.handshake_s, 4) for u in self.users if u.back_at],
            "subscribe_s": [round(u.subscribe_s, 4) for u in self.users if u.back_at],
            "waited_s": [round(u.waited_s, 3) for u in self.users if u.back_at],
            "closes": [round(u.closed_at, 4) for u in self.users if u.closed_at],
            "never_closed": sum(1 for u in self.users if u.mover and not u.closed_at),
        }

    def final_report(self, positions: dict[str, list[Any]], notes: int) -> dict[str, Any]:
        checks: Counter[str] = Counter()
        unrecovered: Counter[str] = Counter()
        gave_up: Counter[str] = Counter()
        for u in self.users:
            checks.update(u.checks)
            unrecovered.update(u.unrecovered)
            if u.gave_up:
                gave_up[u.gave_up] += 1
        behind: Counter[str] = Counter()
        for u in self.users:
            if u.gave_up:
                continue
            for ch, (epoch, seq) in positions.items():
                key = family(ch) if ch != "activity" else ch
                p = u.pos.get(ch)
                if p is None or p[0] != epoch or p[1] < seq:
                    behind[key] += 1
        moved = [u for u in self.users if u.notify and u.closed_at]
        return {
            **self.back_report(),
            "outcomes": dict(self.outcomes),
            "attempts": self.attempts,
            "checks": dict(checks),
            "unrecovered": dict(unrecovered),
            "gave_up": dict(gave_up),
            "behind_at_end": dict(behind),
            "nodes": dict(Counter(u.node or "?" for u in self.users)),
            "notify_users": len(moved),
            "notify_users_resent_all": sum(1 for u in moved if len(u.resent) >= notes),
            "notes_resent": sum(u.resent_count for u in self.users),
            "notes_resent_distinct": sum(len(u.resent) for u in self.users),
            "notes_acked": sum(len(u.acked_notes) for u in self.users),
            "notes_unexpected": sum(len(u.resent) for u in self.users if not u.notify),
            "client_closed": self.stats.closed,
        }


async def run(cfg: dict[str, Any]) -> None:
    from .load import StdinCommands, out

    cmds = StdinCommands()
    await cmds.start()
    storm = Storm(cfg)
    show = bool(cfg.get("progress"))
    try:
        out("L")
        await cmds.expect("connect", cfg.get("go_timeout", 300))
        await storm.connect_all(cfg.get("connect_timeout", 180))
        out(
            "READY",
            {
                "connected": sum(1 for u in storm.users if u.conn is not None),
                "errors": dict(storm.outcomes),
                "nodes": dict(Counter(u.node or "?" for u in storm.users)),
            },
        )
        await cmds.expect("subscribe", cfg.get("go_timeout", 300))
        subscribed = await storm.subscribe_all(cfg.get("subscribe_timeout", 120))
        out("SUBSCRIBED", {"subscribed": subscribed})
        arm = orjson.loads((await cmds.expect("arm", 300)).split(" ", 1)[1])
        late = await storm.wait_caught_up(arm["positions"], arm["notes"], 30)
        node = arm.get("node")  # the node that goes away (None: every one)
        for u in storm.users:
            u.mover = node is None or u.node == node
        storm.deadline = time.monotonic() + float(cfg["recover_timeout"])
        storm.tasks = [asyncio.create_task(storm.survive(u)) for u in storm.users]
        out("ARMED", {"behind": late, "movers": sum(1 for u in storm.users if u.mover)})
        last_show = 0.0
        while not storm.settled() and time.monotonic() < storm.deadline:
            await asyncio.sleep(0.05)
            if show and time.monotonic() - last_show >= 0.5:
                last_show = time.monotonic()
                out(
                    "P",
                    {
                        "phase": "storm",
                        "acked": sum(1 for u in storm.users if u.back_at),
                        "of": sum(1 for u in storm.users if u.mover),
                    },
                )
        out("BACK", storm.back_report())
        check = orjson.loads(
            (await cmds.expect("check", cfg["recover_timeout"] + 120)).split(" ", 1)[1]
        )
        await storm.wait_caught_up(check["positions"], 0, check.get("timeout", 15))
        await asyncio.sleep(0.2)  # the last notification.ack replies
        out("R", storm.final_report(check["positions"], arm["notes"]))
        await cmds.expect("stop", 120)
    finally:
        for t in storm.tasks:
            t.cancel()
        await asyncio.gather(*storm.tasks, return_exceptions=True)
        conns = [u.conn for u in storm.users if u.conn is not None]
        from .load import close_all

        await close_all(conns)  # type: ignore[arg-type]
        cmds.close()
