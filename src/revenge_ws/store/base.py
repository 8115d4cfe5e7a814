"""The durable notification store: its record, its contract and the helpers both backends share.

Two backends implement :class:`NotificationStore` with the same observable behaviour (one test
suite runs against both): :mod:`revenge_ws.store.sqlite` (embedded, the default) and
:mod:`revenge_ws.store.postgres` (for deployments with several hub nodes).

Times are integer milliseconds since the Unix epoch everywhere inside the store; the wire
format (RFC 3339) is produced only by :meth:`Notification.to_wire`.
"""

from __future__ import annotations

import re
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ..codes import ErrorCode
from ..exceptions import RequestError
from ..protocol import now_ms

__all__ = [
    "COLUMNS",
    "DEFAULT_CRITICAL_RETENTION_DAYS",
    "DEFAULT_DEDUPE_WINDOW_MS",
    "DEFAULT_RETENTION_DAYS",
    "LIST_LIMIT_MAX",
    "PRIORITIES",
    "Notification",
    "NotificationStore",
    "OutboxEvent",
    "PageQuery",
    "dedupe_scope",
    "for_users",
    "ms_to_rfc3339",
    "new_id",
    "parse_before",
    "parse_rfc3339",
    "redact_url",
    "stamp",
    "validate_new",
    "validate_preferences",
]

PRIORITIES: Final = ("critical", "high", "normal", "low")
DEFAULT_RETENTION_DAYS: Final = 90.0
DEFAULT_CRITICAL_RETENTION_DAYS: Final = 365.0
DEFAULT_DEDUPE_WINDOW_MS: Final = 5 * 60 * 1000
LIST_LIMIT_MAX: Final = 200
DAY_MS: Final = 86_400_000

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ID_RE: Final = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
_MAX_ID_MS: Final = (1 << 48) - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

#: The columns of a notification row, in the order :meth:`Notification.from_row` reads them.
COLUMNS: Final = (
    "id",
    "user_id",
    "notification_type",
    "title",
    "body",
    "priority",
    "content_id",
    "icon_url",
    "action_url",
    "created_at",
    "is_read",
    "read_at",
    "acked",
    "dedupe_key",
)


@dataclass(frozen=True, slots=True)
class Notification:
    """One stored notification of one user."""

    id: str
    user_id: str
    notification_type: str
    title: str
    body: str | None
    priority: str
    content_id: str | None
    icon_url: str | None
    action_url: str | None
    #: Milliseconds since the Unix epoch.
    created_at: int
    read: bool = False
    read_at: int | None = None
    #: Delivered to the user and acknowledged (``notification.ack``), or read.
    acked: bool = False
    dedupe_key: str | None = None

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> Notification:
        """A row of :data:`COLUMNS` (either backend's; booleans may come as 0/1)."""
        return cls(
            id=r[0],
            user_id=r[1],
            notification_type=r[2],
            title=r[3],
            body=r[4],
            priority=r[5],
            content_id=r[6],
            icon_url=r[7],
            action_url=r[8],
            created_at=r[9],
            read=bool(r[10]),
            read_at=r[11],
            acked=bool(r[12]),
            dedupe_key=r[13],
        )

    def to_wire(self) -> dict[str, object]:
        """The ``data`` of a ``notification`` message (contract §5), and a ``list`` item."""
        return {
            "id": self.id,
            "notification_type": self.notification_type,
            "title": self.title,
            "body": self.body,
            "priority": self.priority,
            "content_id": self.content_id,
            "icon_url": self.icon_url,
            "action_url": self.action_url,
            "created_at": ms_to_rfc3339(self.created_at),
            "read": self.read,
        }


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One event waiting in the outbox for delivery to another system.

    ``payload`` is opaque to the store (the caller's encoding, JSON for playback events);
    ``topic`` names the consumer (``playback``), so one table serves several senders.
    """

    event_id: str
    topic: str
    #: Milliseconds since the Unix epoch; the outbox is read oldest first.
    created_at: int
    payload: str


@dataclass(frozen=True, slots=True)
class PageQuery:
    """A checked :meth:`NotificationStore.list_notifications` request: at most ``limit``,
    unread ones only or all, after the notification ``before_id`` or created before
    ``before_ms`` (at most one of the two)."""

    unread_only: bool
    limit: int
    before_id: str | None
    before_ms: int | None


class NotificationStore(ABC):
    """Durable per-user notifications (contract §5 and §9).

    The backends subclass it: the checks every backend makes the same way live here
    (:meth:`create_many`, :meth:`list_notifications`); each backend writes and reads its
    database in the abstract methods.

    Guarantees every implementation gives:

    * **Isolation.** Every method that takes a ``user_id`` reads and writes only that user's
      rows. Ids of another user behave exactly like ids that do not exist.
    * **Durability.** A write has been committed to stable storage when its coroutine returns;
      a crash afterwards loses nothing.
    * **Errors.** :class:`~revenge_ws.exceptions.StoreUnavailable` when the database cannot be
      reached (or the store is not started / already closed): retryable.
      :class:`~revenge_ws.exceptions.StoreError` for any other database failure.
      :class:`ValueError` for arguments a correct caller never passes (bad priority, empty
      type...). :class:`~revenge_ws.exceptions.RequestError` only from
      :meth:`list_notifications`, for arguments that come straight from a client
      (``limit``, ``before``).
    * **Order.** Notifications are ordered by ``(created_at, id)``. Ids are 26-character
      ULIDs whose time part is ``created_at``, and ids minted by one process in the same
      millisecond increase, so that order is also creation order.
    """

    def __init__(
        self, retention_days: float, critical_retention_days: float, dedupe_window_ms: int
    ) -> None:
        validate_retention(retention_days, critical_retention_days, dedupe_window_ms)
        self.retention_days = retention_days
        self.critical_retention_days = critical_retention_days
        self.dedupe_window_ms = int(dedupe_window_ms)

    @abstractmethod
    async def start(self) -> None:
        """Connect and create or migrate the schema. Calling it again is a no-op.

        Raises ``StoreUnavailable`` when the database cannot be reached, ``StoreError`` when
        its schema is newer than this code.
        """
        ...

    @abstractmethod
    async def close(self) -> None:
        """Release every connection (and thread). Idempotent; later calls raise
        ``StoreUnavailable``."""
        ...

    @abstractmethod
    async def ping(self) -> None:
        """Return when the database answers a query; raise ``StoreUnavailable`` otherwise."""
        ...

    async def create_many(
        self,
        user_ids: Sequence[str],
        *,
        notification_type: str,
        title: str,
        body: str | None = None,
        priority: str = "normal",
        content_id: str | None = None,
        icon_url: str | None = None,
        action_url: str | None = None,
        dedupe_key: str | None = None,
        now_ms: float | None = None,
    ) -> list[tuple[Notification, bool]]:
        """Store one notification per user; answer ``(notification, created)`` per user.

        Users appear once in the answer, in the order of their first occurrence in
        ``user_ids``. ``created`` is False when the call was de-duplicated: the user already
        has a notification with the same *dedupe scope* created less than the de-duplication
        window (5 minutes) before ``now_ms``; that existing notification is answered instead
        and nothing is written for that user. The scope is ``dedupe_key`` when given, else
        ``(notification_type, content_id)`` when ``content_id`` is given; with neither, every
        call creates. The comparison is strict: exactly 5 minutes later creates a new one.

        De-duplication is atomic: concurrent calls (from any number of processes or nodes)
        with the same scope for the same user create exactly one row. The call is
        all-or-nothing and committed durably before it returns.

        ``now_ms`` (default: the wall clock) becomes ``created_at``.
        """
        users, ms = validate_new(user_ids, notification_type, title, priority, now_ms)
        if not users:
            return []
        new = Notification(
            id="",
            user_id="",
            notification_type=notification_type,
            title=title,
            body=body,
            priority=priority,
            content_id=content_id,
            icon_url=icon_url,
            action_url=action_url,
            created_at=ms,
            dedupe_key=dedupe_key,
        )
        fresh, existing = await self._create(
            users, new, dedupe_scope(notification_type, content_id, dedupe_key)
        )
        return [(fresh[u], True) if u in fresh else (existing[u], False) for u in users]

    @abstractmethod
    async def _create(
        self, users: list[str], new: Notification, scope: str | None
    ) -> tuple[dict[str, Notification], dict[str, Notification]]:
        """:meth:`create_many` in the database, in one transaction: ``(fresh, existing)``,
        the notifications written (``new`` for each user with its own id, see
        :func:`for_users`) and, for the users whose call was de-duplicated by ``scope``,
        the notification they already have."""
        ...

    async def pending(
        self, user_id: str, limit: int = 100, *, exclude_types: Sequence[str] = ()
    ) -> list[Notification]:
        """Notifications not yet acknowledged (nor read), oldest first, at most ``limit``.

        The hub sends these after every (re)connect until they are acked: at-least-once.
        ``exclude_types`` leaves out types the user muted in-app, so that muted rows cannot
        fill the ``limit`` and starve the others (the caller may also ack them).
        """
        return await self._pending(user_id, validate_limit(limit), validate_ids(exclude_types))

    @abstractmethod
    async def _pending(self, user_id: str, limit: int, excluded: list[str]) -> list[Notification]:
        """:meth:`pending` with checked arguments."""
        ...

    async def pending_many(
        self, user_ids: Sequence[str], limit: int = 100
    ) -> dict[str, list[Notification]]:
        """:meth:`pending` of many users in one query, each user's muted types left out
        (their preferences with ``push`` off): ``{user_id: notifications}`` with an entry
        (maybe empty) for every user asked. A reconnect storm re-sends to thousands of
        users within seconds; one query per batch instead of two per user.
        """
        validate_limit(limit)
        out: dict[str, list[Notification]] = {}
        for chunk in validate_users(user_ids):
            out.update((u, []) for u in chunk)
            for note in await self._pending_of(chunk, limit):
                out[note.user_id].append(note)
        return out

    @abstractmethod
    async def _pending_of(self, users: list[str], limit: int) -> list[Notification]:
        """:meth:`pending_many` of at most :data:`PENDING_BATCH` users in one query."""
        ...

    @abstractmethod
    async def ack(self, user_id: str, ids: Sequence[str]) -> list[str]:
        """Mark these notifications delivered; answer the ids that belong to ``user_id``.

        Idempotent (an id acked before is answered again). Ids not answered do not exist
        for this user and were not touched: the caller answers ``NOT_FOUND`` for them.
        The answer keeps the order of ``ids``, without repeats.
        """
        ...

    @abstractmethod
    async def mark_read(
        self, user_id: str, ids: Sequence[str], *, now_ms: float | None = None
    ) -> list[str]:
        """Mark these notifications read (and so delivered); same answer as :meth:`ack`.

        ``read_at`` keeps the time of the first read.
        """
        ...

    @abstractmethod
    async def read_all(self, user_id: str, now_ms: float | None = None) -> int:
        """Mark every unread notification of the user read; answer how many changed."""
        ...

    async def list_notifications(
        self,
        user_id: str,
        unread_only: bool = False,
        limit: int = 50,
        before: str | None = None,
    ) -> tuple[list[Notification], int]:
        """One page of the user's notifications, newest first, and the user's unread count.

        ``limit`` must be 1..200. ``before`` continues a listing:

        * a notification id (normally the last item of the previous page): the page starts
          right after it in newest-first order, ties on ``created_at`` broken by id, so
          paging visits every notification exactly once;
        * an RFC 3339 time with an offset (``2026-11-27T10:00:00Z``): notifications created
          strictly before it.

        Raises ``RequestError(INVALID_MESSAGE)`` for a bad ``limit`` or a ``before`` that is
        neither, and ``RequestError(NOT_FOUND)`` for an id this user does not have (deleted
        by retention, or another user's).
        """
        before_id, before_ms = parse_before(before)
        q = PageQuery(unread_only, validate_list_limit(limit), before_id, before_ms)
        return await self._page(user_id, q)

    @abstractmethod
    async def _page(self, user_id: str, q: PageQuery) -> tuple[list[Notification], int]:
        """:meth:`list_notifications` with checked arguments, in one consistent read: the
        page and the unread count (raise :func:`unknown_cursor` when ``q.before_id`` names
        no notification of the user)."""
        ...

    @abstractmethod
    async def get(self, user_id: str, id: str) -> Notification | None:
        """The user's notification with this id, or None (also for another user's id)."""
        ...

    @abstractmethod
    async def get_preferences(self, user_id: str) -> dict[str, bool]:
        """``notification_type`` → pushed in-app, for the types the user set explicitly.

        A type not in the answer uses the hub's default (pushed). A muted type is still
        stored and listed; whether to push is the caller's decision.
        """
        ...

    @abstractmethod
    async def set_preferences(self, user_id: str, prefs: Mapping[str, bool | None]) -> None:
        """Merge ``prefs`` into the user's preferences; ``None`` removes an entry."""
        ...

    @abstractmethod
    async def cleanup(self, now_ms: float | None = None) -> int:
        """Delete notifications past retention; answer how many were deleted.

        Retention is counted from ``created_at``: 90 days, ``critical`` 1 year (both set by
        the constructor), whether or not the notification was read or acknowledged.
        """
        ...

    # -- the outbox: events for another system, kept until it confirms them --------------
    #
    # At-least-once delivery across restarts: a sender adds events (committed before the
    # call returns), claims the oldest for a while (a lease, so that several hub nodes
    # sharing one database do not send the same events at once, and a node that died
    # holding a claim delays them only until the lease ends), and deletes them once the
    # other system confirmed them, or releases them after a failure.

    async def outbox_add(self, events: Sequence[OutboxEvent]) -> None:
        """Store these events, all in one transaction, committed when the call returns.

        An ``event_id`` already in the outbox is left as it is (adding is idempotent).
        """
        checked = validate_outbox_events(events)
        if checked:
            await self._outbox_add(checked)

    @abstractmethod
    async def _outbox_add(self, events: list[OutboxEvent]) -> None:
        """:meth:`outbox_add` with checked events."""
        ...

    async def outbox_claim(
        self, topic: str, limit: int, lease_ms: int, *, now_ms: float | None = None
    ) -> list[OutboxEvent]:
        """The oldest events of ``topic`` nobody holds, at most ``limit``, ordered by
        ``(created_at, event_id)``; each is held for ``lease_ms`` from ``now_ms``.

        An event is held by one claim at a time, even when callers on several nodes claim
        at once; once its lease ends (the holder died, or forgot) the next claim gets it
        again. Release or delete what a claim answered.
        """
        if lease_ms < 0:
            raise ValueError(f"lease_ms must not be negative, not {lease_ms!r}")
        return await self._outbox_claim(topic, validate_limit(limit), stamp(now_ms), lease_ms)

    @abstractmethod
    async def _outbox_claim(
        self, topic: str, limit: int, now: int, lease_ms: int
    ) -> list[OutboxEvent]:
        """:meth:`outbox_claim` with checked arguments, atomically."""
        ...

    async def outbox_release(self, event_ids: Sequence[str]) -> None:
        """End the lease of these events: the next claim (of any node) may take them."""
        ids = validate_ids(event_ids)
        if ids:
            await self._outbox_release(ids)

    @abstractmethod
    async def _outbox_release(self, ids: list[str]) -> None: ...

    async def outbox_delete(self, event_ids: Sequence[str]) -> int:
        """Delete these events (delivered); answer how many were there. Unknown ids are
        ignored."""
        ids = validate_ids(event_ids)
        return await self._outbox_delete(ids) if ids else 0

    @abstractmethod
    async def _outbox_delete(self, ids: list[str]) -> int: ...

    @abstractmethod
    async def outbox_stats(self, topic: str) -> tuple[int, int | None]:
        """``(events, oldest created_at)`` of ``topic``, held or not; ``(0, None)`` when
        there are none."""
        ...


def stamp(now: float | None) -> int:
    """A store time: integer milliseconds of ``now``, or of the wall clock when None."""
    return int(now_ms() if now is None else now)


def for_users(
    new: Notification, users: Sequence[str], ids: Mapping[str, str] | None = None
) -> dict[str, Notification]:
    """``new`` for each of ``users``, with the id given in ``ids`` or a fresh one."""
    return {
        u: replace(new, id=new_id(new.created_at) if ids is None else ids[u], user_id=u)
        for u in users
    }


def ms_to_rfc3339(ms: int) -> str:
    """``2026-11-27T10:00:00.123Z``: millisecond precision, always UTC."""
    # Integer arithmetic: a float timestamp can turn .123 into .122999 and lose a millisecond.
    dt = _EPOCH + timedelta(milliseconds=ms)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> int:
    """Milliseconds since the epoch; ``ValueError`` unless ``text`` is RFC 3339 with an offset."""
    # fromisoformat also takes forms RFC 3339 forbids (week dates, no separators); requiring
    # the full date, a time and an offset keeps both backends and all clients in agreement.
    if not re.fullmatch(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", text):
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    dt = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    return (dt - _EPOCH) // timedelta(milliseconds=1)


class _IdGenerator:
    """Monotonic ULIDs: 48-bit millisecond time, then 80 bits that are random per millisecond.

    Within one millisecond the random part is incremented instead of redrawn, so ids from
    one process sort in creation order. The first draw of a millisecond leaves the top bit
    clear, so increments cannot overflow in practice.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def __call__(self, ms: int) -> str:
        if not 0 <= ms <= _MAX_ID_MS:
            raise ValueError(f"time out of range for an id: {ms}")
        with self._lock:
            rand = self._last_rand + 1 if ms == self._last_ms else secrets.randbits(79)
            self._last_ms, self._last_rand = ms, rand
        value = (ms << 80) | rand
        chars = []
        for _ in range(26):
            chars.append(_CROCKFORD[value & 31])
            value >>= 5
        return "".join(reversed(chars))


new_id = _IdGenerator()


def dedupe_scope(
    notification_type: str, content_id: str | None, dedupe_key: str | None
) -> str | None:
    """What two notifications of one user must share to be duplicates (None: never).

    The prefixes keep a publisher's key from ever equalling a (type, content) pair.
    """
    if dedupe_key is not None:
        return "k:" + dedupe_key
    if content_id is not None:
        return "c:" + notification_type + "\x1f" + content_id
    return None


def validate_new(
    user_ids: Sequence[str],
    notification_type: str,
    title: str,
    priority: str,
    now: float | None,
) -> tuple[list[str], int]:
    """Check :meth:`NotificationStore.create_many` arguments; answer unique users and time."""
    if isinstance(user_ids, str):
        raise TypeError("user_ids must be a sequence of user ids, not one string")
    unique: dict[str, None] = {}
    for uid in user_ids:
        if not isinstance(uid, str) or not uid:
            raise ValueError(f"invalid user id: {uid!r}")
        unique[uid] = None
    if not isinstance(notification_type, str) or not notification_type:
        raise ValueError("notification_type must be a non-empty string")
    if not isinstance(title, str):
        raise ValueError("title must be a string")
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    return list(unique), stamp(now)


def validate_ids(ids: Sequence[str]) -> list[str]:
    """Unique ids in their first order; anything that is not a string is dropped.

    Dropping (instead of raising) lets the caller answer ``NOT_FOUND`` for such ids like for
    any other id the user does not have.
    """
    if isinstance(ids, str):
        raise TypeError("ids must be a sequence of ids, not one string")
    return list(dict.fromkeys(i for i in ids if isinstance(i, str)))


#: Users per :meth:`NotificationStore.pending_many` query (bounds its bind parameters).
PENDING_BATCH = 500


def validate_users(user_ids: Sequence[str]) -> list[list[str]]:
    """Unique user ids in chunks of at most :data:`PENDING_BATCH`."""
    users = validate_ids(user_ids)
    return [users[i : i + PENDING_BATCH] for i in range(0, len(users), PENDING_BATCH)]


def validate_outbox_events(events: Sequence[OutboxEvent]) -> list[OutboxEvent]:
    """The events with their first occurrence of each ``event_id``; ValueError for an empty
    id, topic or a time out of range."""
    unique: dict[str, OutboxEvent] = {}
    for event in events:
        if not isinstance(event, OutboxEvent):
            raise TypeError(f"not an OutboxEvent: {event!r}")
        if not event.event_id or not event.topic:
            raise ValueError(f"an outbox event needs an event_id and a topic: {event!r}")
        if not 0 <= event.created_at <= _MAX_ID_MS:
            raise ValueError(f"created_at out of range: {event.created_at!r}")
        unique.setdefault(event.event_id, event)
    return list(unique.values())


def validate_limit(limit: int, maximum: int | None = None) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, not {limit!r}")
    if maximum is not None and limit > maximum:
        raise ValueError(f"limit must be at most {maximum}, not {limit}")
    return limit


def validate_list_limit(limit: int) -> int:
    try:
        return validate_limit(limit, LIST_LIMIT_MAX)
    except ValueError as exc:
        raise RequestError(ErrorCode.INVALID_MESSAGE, str(exc)) from None


def parse_before(before: str | None) -> tuple[str | None, int | None]:
    """Split a ``list`` ``before`` argument into ``(id, None)`` or ``(None, ms)``."""
    if before is None:
        return None, None
    if isinstance(before, str):
        if _ID_RE.fullmatch(before):
            return before, None
        try:
            return None, parse_rfc3339(before)
        except ValueError:
            pass
    raise RequestError(
        ErrorCode.INVALID_MESSAGE,
        "'before' must be a notification id or an RFC 3339 time",
    )


def unknown_cursor() -> RequestError:
    return RequestError(ErrorCode.NOT_FOUND, "'before' names no notification of this user")


def validate_preferences(prefs: Mapping[str, bool | None]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for key, value in prefs.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"invalid notification type: {key!r}")
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"preference for {key!r} must be true, false or null")
        out[key] = value
    return out


def retention_cutoffs(
    now: float | None, retention_days: float, critical_retention_days: float
) -> tuple[int, int]:
    """``(normal, critical)``: rows created strictly before these times are past retention."""
    ms = stamp(now)
    return ms - int(retention_days * DAY_MS), ms - int(critical_retention_days * DAY_MS)


def validate_retention(
    retention_days: float, critical_retention_days: float, dedupe_window_ms: int
) -> None:
    if retention_days <= 0 or critical_retention_days <= 0:
        raise ValueError("retention must be a positive number of days")
    if dedupe_window_ms < 0:
        raise ValueError("dedupe_window_ms must not be negative")


_SECRET_PARAM_RE: Final = re.compile(
    r"(?i)((?:^|[?&;\s])[\w.-]*(?:password|passwd|secret|token|api_?key)[\w.-]*\s*=\s*)"
    r"('[^']*'|[^&;\s#]*)"
)


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***``, safe to log.

    Masks the password of the user-info part (``scheme://user:secret@host`` and
    ``redis://:secret@host``), password-like query parameters (``?password=``,
    ``sslpassword=``, ``token=``...) and libpq ``key=value`` strings. Never raises: a string
    it cannot parse is masked generously rather than returned as is.
    """
    text = str(url)
    scheme_end = text.find("://")
    if scheme_end >= 0:
        start = scheme_end + 3
        # The authority ends at the first "/", "?" or "#"; but an unencoded "/" inside a
        # password would end it early, so look for the user-info "@" up to "?"/"#" instead.
        stop = len(text)
        for sep in "?#":
            pos = text.find(sep, start)
            if pos >= 0:
                stop = min(stop, pos)
        at = text.rfind("@", start, stop)
        if at >= 0:
            userinfo = text[start:at]
            user, colon, _ = userinfo.partition(":")
            if colon:
                text = f"{text[:start]}{user}:***{text[at:]}"
    return _SECRET_PARAM_RE.sub(lambda m: m.group(1) + "***", text)
