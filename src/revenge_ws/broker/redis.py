"""The Redis broker: publish/subscribe and history shared by every node.

Needs Redis >= 7 (or Valkey / Dragonfly) and ``redis`` (redis-py >= 5, the optional
dependency ``revenge-ws[redis]``); only the ``broker/redis*`` modules and
``syncplay/redis_store`` import it. Only plain commands, EVAL/EVALSHA scripts, Streams and
pub/sub are used (no Functions, no modules).

The broker is split by concern: this module (publish, history, control, key/values, the
lifecycle), :mod:`.redis_presence` (cluster-wide presence), :mod:`.redis_link` (the
pub/sub link and its reconnects), :mod:`revenge_ws.redis_errors` (how Redis failures map to hub
errors) and the Lua scripts in ``broker/lua/``.

Key layout (``P`` is the key prefix, default ``revenge``; ``C`` a channel; presence keys
are listed in :mod:`.redis_presence`)::

    P:ch:C            hash    epoch, seq, ttl (history ttl, ms), rid (run id and replication
                              id of the server that started the epoch)   TTL max(channel_ttl, ttl)
    P:hist:C          stream  id "<seq>-0", fields t (Redis ms), p (payload)   TTL = ttl
    P:idem:C:K        string  "<epoch>:<seq>" of the first publish with key K
    P:kv:K            string  set_if_absent / get_value / set_value
    P:pub:C           pub/sub channel of C's publications (payload = the publication JSON)
    P:control         pub/sub channel of control messages

Every write of a channel's seq, history and pub/sub happens in one Lua script, so the three
can never disagree. Times that matter across nodes (history TTL, presence expiry) are
Redis' own clock (``TIME`` in the scripts), so node clock skew does not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable
from datetime import datetime
from typing import Any, TypeVar

import orjson
from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import RedisError
from redis.typing import EncodableT

from ..config import HistoryFamily
from ..exceptions import BrokerError, BrokerUnavailable, ConfigError
from ..protocol import StreamPosition, rfc3339
from ..redis_errors import RedisErrorPolicy, redis_call
from .base import BrokerHandler, HistoryResult, Publication
from .redis_batch import AutoPipeline
from .redis_link import LinkKeeper, PubSubLink
from .redis_pool import open_pool
from .redis_presence import RedisPresence
from .redis_scripts import lua

__all__ = ["RedisBroker", "RedisPresence", "decode_publication"]

log = logging.getLogger("revenge_ws.broker.redis")

T = TypeVar("T")

#: How long closing the broker may wait for its tasks and connections (s).
CLOSE_TIMEOUT = 5.0
#: How often (s) a broker behind Sentinel checks that its pub/sub link is on the master.
MASTER_WATCH = 1.0
#: Keys per broker call (one timeout) in :meth:`RedisBroker.set_values`.
KV_BATCH = 1000


def _ms(seconds: float) -> int:
    """A positive TTL in ms (Redis refuses 0 for PX/PEXPIRE)."""
    return max(1, int(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _created_ms(timestamp: Any) -> float:
    try:
        return datetime.fromisoformat(timestamp).timestamp() * 1000.0
    except (TypeError, ValueError):
        return time.time() * 1000.0


def decode_publication(payload: bytes) -> Publication:
    """Build a :class:`Publication` from its JSON payload without re-encoding it.

    Raises ``ValueError`` when the payload is not a publication envelope.
    """
    obj = orjson.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("a publication must be a JSON object")
    channel, mtype, seq = obj.get("channel"), obj.get("type"), obj.get("seq")
    epoch, data, ts = obj.get("epoch"), obj.get("data"), obj.get("timestamp")
    if not (
        isinstance(channel, str)
        and isinstance(mtype, str)
        and isinstance(seq, int)
        and isinstance(epoch, str)
        and isinstance(data, dict)
        and isinstance(ts, str)
    ):
        raise ValueError("not a publication envelope")
    return Publication(channel, mtype, seq, epoch, data, ts, _created_ms(ts), payload=payload)


class RedisBroker:
    """:class:`~revenge_ws.broker.base.Broker` on Redis, shared by every node.

    Guarantees (beyond the Protocol's):

    * ``publish`` runs one script that checks the idempotency key, assigns ``seq``,
      appends to history and PUBLISHes the payload: all or nothing. The payload (the
      publication's JSON) is encoded once by the publisher; every node builds its
      :class:`Publication` from those bytes without re-encoding them.
    * A channel whose meta hash is missing (new, expired after ``channel_ttl`` idle
      seconds, or lost by Redis: FLUSHALL, restart without persistence) gets a new
      epoch on the next publish *or* history read, and its old history is dropped:
      never a silent gap, never two epochs mixed.
    * ``history(since=...)`` is never partial: ``recovered=False`` and no publications
      when ``since`` is of another epoch, ahead of the top, older than the retained
      window (size or TTL, judged in Redis time) or more than ``limit`` behind.
    * One pub/sub connection per node carries one subscription per channel plus the
      control channel. It is rebuilt after any failure with a bounded, jittered backoff
      (``reconnect_min`` → ``reconnect_max``), re-subscribes everything, then calls
      ``handler.on_reconnect()``. A heartbeat (PING when idle) detects a dead peer.
    * Every call is bounded by ``timeout`` (connect, socket and pool waits too) and
      raises :class:`BrokerUnavailable` when Redis is unreachable, busy or read-only;
      nothing is retried behind the caller's back (a retried publish could publish
      twice). A publish that timed out *after* Redis received it may still have been
      published: the idempotency key makes a retry safe.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        timeout: float = 5.0,
        prefix: str = "revenge",
        idempotency_ttl: float = 600.0,
        channel_ttl: float = 86_400.0,
        presence_ttl: float = 30.0,
        presence_refresh: float = 10.0,
        max_connections: int = 64,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        heartbeat: float = 5.0,
        min_replicas: int = 0,
    ) -> None:
        if not 0 < presence_refresh < presence_ttl:
            raise ConfigError("redis broker: presence_refresh must be in (0, presence_ttl)")
        if not 0 < reconnect_min <= reconnect_max:
            raise ConfigError("redis broker: need 0 < reconnect_min <= reconnect_max")
        self.node_id = node_id
        self.prefix = prefix
        self.timeout = timeout
        self.idempotency_ttl = idempotency_ttl
        self.channel_ttl = channel_ttl
        self.presence_ttl = presence_ttl
        self.presence_refresh = presence_refresh
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.heartbeat = heartbeat
        self.min_replicas = min_replicas
        self._pool, self._close_pool_extras = open_pool(
            url, node_id=node_id, timeout=timeout, max_connections=max_connections
        )
        self._redis: Redis = Redis(connection_pool=self._pool)
        #: The small calls of handshakes and subscribes, pipelined per loop iteration.
        self.batch = AutoPipeline(self._redis)
        self._publish_script = self._redis.register_script(lua("publish"))
        self._history_script = self._redis.register_script(lua("history"))
        self._set_if_absent_script = self._redis.register_script(lua("set_if_absent"))
        self._presence = RedisPresence(self)
        self._control = f"{prefix}:control".encode()
        self._pub_prefix = f"{prefix}:pub:".encode()
        self._handler: BrokerHandler | None = None
        self._channels: set[str] = set()
        self._links = LinkKeeper(
            make_connection=self._pool.make_connection,
            wanted=self._wanted,
            on_message=self._on_message,
            on_ready=self._on_ready,
            timeout=timeout,
            heartbeat=heartbeat,
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
        )
        self._refresh_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._bad_payload_logged = False

    @property
    def presence(self) -> RedisPresence:
        return self._presence

    @property
    def redis(self) -> Redis:
        """The shared client (bounded pool, no retries) for other Redis-backed stores of
        this node, e.g. SyncPlay rooms; they use keys under :attr:`prefix` that do not
        collide with the ones above. Closed by :meth:`close`."""
        return self._redis

    @property
    def _link(self) -> PubSubLink | None:
        """The pub/sub link, while one is connected (ready or not)."""
        return self._links.link

    # -- plumbing ----------------------------------------------------------------------
    async def _run(self, aw: Awaitable[T]) -> T:
        """Await one Redis operation within ``timeout``; map failures to broker errors
        (:attr:`RedisErrorPolicy.BROKER`)."""
        result = await redis_call(aw, RedisErrorPolicy.BROKER, self.timeout)
        if self._links.down:
            # Redis answers again: reconnect the pub/sub link now, not after the backoff.
            self._links.wake.set()
        return result

    def _keys(self, channel: str) -> list[str]:
        return [f"{self.prefix}:ch:{channel}", f"{self.prefix}:hist:{channel}"]

    def _rch(self, channel: str) -> bytes:
        return self._pub_prefix + channel.encode()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, handler: BrokerHandler) -> None:
        """Start the listener and presence tasks; waits for the first connection
        attempt (at most ``timeout``) but does not fail when Redis is down: the link
        keeps retrying and :meth:`ping` reports the outage."""
        self._handler = handler
        loop = asyncio.get_running_loop()
        first_attempt = self._links.first_attempt = loop.create_future()
        self._tasks = [
            asyncio.create_task(self._links.run(), name=f"revenge-redis-listener-{self.node_id}"),
            asyncio.create_task(
                self._refresh_loop(), name=f"revenge-redis-presence-{self.node_id}"
            ),
        ]
        if isinstance(self._pool, SentinelConnectionPool):
            self._tasks.append(
                asyncio.create_task(
                    self._watch_master(self._pool), name=f"revenge-redis-sentinel-{self.node_id}"
                )
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(first_attempt), self.timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        # Every wait is bounded: a close must never hang a shutting-down node.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Entries left by connections the node did not close: drop them now rather
        # than leaving them for presence_ttl (best effort; Redis may be down).
        with contextlib.suppress(BrokerError, TimeoutError):
            async with asyncio.timeout(min(self.timeout, 2.0)):
                await self._presence.forget_all()
        self._handler = None
        await self.batch.close()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._redis.aclose()
                await self._pool.disconnect()
                await self._close_pool_extras()

    async def ping(self) -> None:
        """Raise ``BrokerUnavailable`` unless Redis answers and the pub/sub link is up."""
        await self._run(self._redis.ping())
        self._links.ready_link()

    # -- publish / history ---------------------------------------------------------------
    async def publish(
        self,
        channel: str,
        mtype: str,
        data: dict[str, Any],
        history: HistoryFamily,
        *,
        idempotency_key: str | None = None,
    ) -> Publication:
        now = time.time() * 1000.0
        ts = rfc3339(now)
        # The envelope of protocol.encode_publication, split around seq/epoch (which only
        # the script knows); the script and this method join the parts identically.
        head = b'{"type":' + orjson.dumps(mtype) + b',"channel":' + orjson.dumps(channel)
        head += b',"seq":'
        tail = b',"timestamp":' + orjson.dumps(ts) + b',"data":' + orjson.dumps(data) + b"}"
        keys = self._keys(channel)
        if idempotency_key and self.idempotency_ttl > 0:
            keys.append(f"{self.prefix}:idem:{channel}:{idempotency_key}")
        args: list[EncodableT] = [
            secrets.token_hex(6),
            head,
            tail,
            history.size,
            _ms(history.ttl) if history.ttl > 0 else 0,
            _ms(self.channel_ttl),
            _ms(self.idempotency_ttl),
            self._rch(channel),
        ]
        if self.min_replicas > 0:
            res = await self._run(self._publish_replicated(keys, args))
        else:
            res = await self._run(self._publish_script(keys, args))
        fresh, epoch, seq = int(res[0]), _text(res[1]), int(res[2])
        if not fresh:
            if len(res) > 3 and res[3]:
                return decode_publication(res[3])
            # The first publication is no longer in history: its position is all we know.
            return Publication(channel, mtype, seq, epoch, data, ts, now)
        payload = head + str(seq).encode() + b',"epoch":"' + epoch.encode() + b'"' + tail
        return Publication(channel, mtype, seq, epoch, data, ts, now, payload=payload)

    async def _publish_replicated(self, keys: list[str], args: list[EncodableT]) -> Any:
        """The publish script, then ``WAIT min_replicas`` on the same connection: the
        publication is acked only once that many replicas have it."""
        async with self._redis.client() as conn:
            res = await self._publish_script(keys, args, client=conn)
            # Also for a repeated idempotency key: its first attempt may have failed here.
            wait_ms = max(1, int(self.timeout * 500))
            acked = int(
                await conn.execute_command("WAIT", self.min_replicas, wait_ms)  # type: ignore[no-untyped-call]
            )
            if acked < self.min_replicas:
                # Published (and maybe delivered) but not safe from a failover yet: the
                # caller's retry with the same idempotency key returns this position.
                raise BrokerUnavailable(
                    f"publication reached {acked} of {self.min_replicas} redis replicas"
                )
        return res

    async def history(
        self, channel: str, since: StreamPosition | None = None, limit: int = 0
    ) -> HistoryResult:
        args: list[EncodableT] = [
            secrets.token_hex(6),
            "" if since is None else since.epoch,
            0 if since is None else since.seq,
            limit,
            _ms(HistoryFamily().ttl),
            _ms(self.channel_ttl),
        ]
        res = await self._run(self.batch.script(self._history_script, self._keys(channel), args))
        position = StreamPosition(_text(res[0]), int(res[1]))
        pubs = [decode_publication(p) for p in res[3:]]
        return HistoryResult(position, pubs, bool(int(res[2])))

    # -- subscriptions -------------------------------------------------------------------
    async def subscribe(self, channel: str) -> None:
        """Subscribe this node's pub/sub link to ``channel`` and wait until Redis
        confirms. Raises ``BrokerUnavailable`` while the link is down."""
        if channel in self._channels:
            return
        link = self._links.ready_link()
        self._channels.add(channel)
        try:
            await self._run(link.subscribe(self._rch(channel)))
        except BaseException:
            self._channels.discard(channel)
            raise

    async def unsubscribe(self, channel: str) -> None:
        """Never raises: a link that is down is rebuilt without the channel anyway."""
        self._channels.discard(channel)
        link = self._link
        if link is not None and link.ready:
            with contextlib.suppress(RedisError, OSError):
                link.unsubscribe(self._rch(channel))

    # -- control / kv ------------------------------------------------------------------
    async def publish_control(self, message: dict[str, Any]) -> None:
        """PUBLISH to every other node; this node's ``on_control`` runs locally (soon,
        not inline), so it gets the message even while its own link is down."""
        blob = orjson.dumps({"from": self.node_id, "m": message})
        await self._run(self._redis.publish(self._control, blob))
        handler = self._handler
        if handler is not None:
            asyncio.get_running_loop().call_soon(handler.on_control, message)

    async def set_if_absent(self, key: str, value: str, ttl: float) -> str | None:
        old = await self._run(
            self._set_if_absent_script([f"{self.prefix}:kv:{key}"], [value, _ms(ttl)])
        )
        return None if old is None else _text(old)

    async def get_value(self, key: str) -> str | None:
        value = await self._run(self.batch.command("GET", f"{self.prefix}:kv:{key}"))
        return None if value is None else _text(value)

    async def get_values(self, keys: list[str]) -> list[str | None]:
        if not keys:
            return []
        values = await self._run(self._redis.mget([f"{self.prefix}:kv:{k}" for k in keys]))
        return [None if v is None else _text(v) for v in values]

    async def set_value(self, key: str, value: str, ttl: float) -> None:
        await self._run(self._redis.set(f"{self.prefix}:kv:{key}", value, px=_ms(ttl)))

    async def set_values(self, values: dict[str, str], ttl: float) -> None:
        items = list(values.items())
        px = _ms(ttl)
        for i in range(0, len(items), KV_BATCH):
            sets = [
                self.batch.command("SET", f"{self.prefix}:kv:{key}", value, "PX", px)
                for key, value in items[i : i + KV_BATCH]
            ]
            await self._run(self.batch.all(sets))

    # -- the pub/sub link ----------------------------------------------------------------
    def _wanted(self) -> list[bytes]:
        return [self._control, *(self._rch(ch) for ch in self._channels)]

    def _on_ready(self, reconnected: bool) -> None:
        if not reconnected:
            return
        log.info("redis pub/sub link restored; %d channels re-subscribed", len(self._channels))
        # Presence may have been lost with Redis' data: put ours back now.
        self._refresh_now.set()
        handler = self._handler
        if handler is not None:
            try:
                handler.on_reconnect()
            except Exception:
                log.exception("on_reconnect failed")

    def _on_message(self, rch: bytes, data: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            if rch == self._control:
                msg = orjson.loads(data)
                if not isinstance(msg, dict) or not isinstance(msg.get("m"), dict):
                    raise ValueError("not a control envelope")
                if msg.get("from") != self.node_id:  # the sender delivered it locally
                    handler.on_control(msg["m"])
                return
            if not rch.startswith(self._pub_prefix):
                return
            if rch[len(self._pub_prefix) :].decode() not in self._channels:
                return  # an UNSUBSCRIBE still in flight
            pub = decode_publication(data)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
            # Someone else writes to our channels: never let it break the link.
            if not self._bad_payload_logged:
                self._bad_payload_logged = True
                log.warning("dropping a malformed message on %r: %s", rch, exc)
            return
        except Exception:
            log.exception("on_control failed")
            return
        try:
            handler.on_publication(pub)
        except Exception:
            log.exception("on_publication failed for %s", pub.channel)

    # -- Sentinel ------------------------------------------------------------------------
    async def _watch_master(self, pool: SentinelConnectionPool) -> None:
        """Every ``MASTER_WATCH`` seconds ask the sentinels where the master is; when the
        pub/sub link is on another server (a planned failover leaves the demoted master's
        pub/sub clients connected), rebuild it. Asking also drops idle pool connections
        to a former master."""
        while True:
            await asyncio.sleep(MASTER_WATCH)
            try:
                async with asyncio.timeout(self.timeout):
                    host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("sentinel: no master now: %s", exc)
                continue
            link = self._links.link
            if link is None or not link.ready:
                continue
            conn: Any = link.conn
            if (conn.host, int(conn.port)) != (host, int(port)):
                log.warning(
                    "redis master is now %s:%s (sentinel); moving the pub/sub link", host, port
                )
                await link.close()

    # -- presence refresh ------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see _listen
                async with asyncio.timeout(self.presence_refresh):
                    await self._refresh_now.wait()
            self._refresh_now.clear()
            try:
                await self._presence.refresh()
            except BrokerUnavailable as exc:
                log.debug("presence refresh skipped: %s", exc)
            except Exception:
                log.exception("presence refresh failed")
