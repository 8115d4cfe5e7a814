"""Settings: a YAML file plus ``REVENGE_*`` environment variables, validated at startup.

Every key has a default (see ``docs/configuration.md``). The environment wins over the
file. The environment name of a key is ``REVENGE_`` + its dotted path in upper case with
dots turned into underscores: ``server.port`` → ``REVENGE_SERVER_PORT``,
``allowed_origins`` → ``REVENGE_ALLOWED_ORIGINS``. List values in the environment are
comma-separated. A bad value stops startup with a message that names the key.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from .exceptions import ConfigError

__all__ = ["Settings", "env_names", "load_settings"]

log = logging.getLogger(__name__)

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")
MIN_SECRET_BYTES = 32


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: Seconds a SIGTERM may take: connections get 1012, then the process exits 0.
    shutdown_timeout: float = Field(15.0, gt=0, le=300)
    #: Seconds from TCP accept until the WebSocket upgrade must be complete.
    handshake_timeout: float = Field(10.0, gt=0, le=300)
    #: Who serves a socket whose first request is a WebSocket upgrade: ``direct`` (the
    #: hub's own engine on websockets' sans-I/O protocol, ~12 KiB less per connection) or
    #: ``aiohttp``. Other requests, and upgrades on kept-alive connections, are aiohttp's.
    ws_engine: Literal["direct", "aiohttp"] = "direct"
    #: Seconds an HTTP request body may take to arrive, from when the hub starts reading
    #: it; a slower one is answered 408 ``INVALID_MESSAGE`` and its connection is closed.
    body_timeout: float = Field(10.0, gt=0, le=300)
    #: Accepted WebSocket handshakes per second per node (token bucket), and its burst.
    accept_rate: float = Field(1000.0, gt=0)
    accept_burst: int = Field(2000, ge=1)
    #: Open WebSocket connections per node; the next handshake gets 503.
    max_connections: int = Field(10000, ge=1)
    #: WebSocket handshakes a node works on at once (from the request to the ``welcome``)
    #: at least; more when its measured pace says it answers them within 1.5 s (at most
    #: 2,048). The next one gets 503 with ``Retry-After`` before its token is looked at.
    max_pending_handshakes: int = Field(128, ge=1)
    #: A node whose event loop runs later than this (s) answers new handshakes 503 at once,
    #: so that the work it has accepted finishes while its clients still wait; 0: never.
    max_loop_lag: float = Field(2.0, ge=0, le=60)
    #: Connections the kernel holds for the node before it accepts them (Linux caps it at
    #: ``net.core.somaxconn``, 4096 by default). The node accepts everything waiting at
    #: each readiness (128 at a time) and then serves or refuses it (503), so this queue
    #: only has to absorb a burst that arrives during one busy loop iteration. Past it the
    #: kernel drops the client's handshake ACK and retransmits after 1 s, 3 s, 7 s: a
    #: client that could have been told to come back later times out instead.
    listen_backlog: int = Field(2048, ge=16, le=65535)
    #: Serve the dashboard/demo pages and the JS client.
    static: bool = True
    #: Seconds over which clients told to come back (1001, 1012, 4002-4004 closes: their
    #: reason says ``window=N``; 503s: ``Reconnect-Window``) spread their reconnects; longer
    #: when the node has more connections than ``accept_rate`` admits within it.
    restart_window: float = Field(5.0, ge=0, le=300)
    #: Handshakes per second (counted per whole second) that make a reconnect storm. While
    #: one lasts, and for STORM_HOLD seconds after, publications on the shared families
    #: (activity, library, server, sessions, transcode) may wait ``storm_linger`` seconds in
    #: each outbox, so that a connection gets one write per linger instead of one per
    #: publication: that write is most of what fan-out costs a node that is also taking
    #: thousands of handshakes. Replies, SyncPlay and a user's own channels never wait.
    storm_handshakes: int = Field(50, ge=1)
    #: See ``storm_handshakes``; 0: publications never wait.
    storm_linger: float = Field(1.0, ge=0, le=5)


class NodeSettings(_Section):
    #: Unique per node; empty = hostname + random suffix.
    id: str = ""


class JwtSettings(_Section):
    #: HMAC secret (HS256/384/512), at least 32 bytes.
    secret: SecretStr | None = None
    #: PEM public key for RS*/ES*/PS*/EdDSA.
    public_key_file: Path | None = None
    #: PEM private key, only for ``revenge-ws token`` with an asymmetric algorithm.
    private_key_file: Path | None = None
    algorithm: str = "HS256"
    audience: str | None = None
    issuer: str | None = None
    #: Clock skew tolerated on exp/nbf/iat, seconds.
    leeway: float = Field(10.0, ge=0, le=300)
    #: Seconds after exp before an unrefreshed connection is closed with 4001.
    expiry_grace: float = Field(25.0, ge=0, le=3600)
    #: Tokens longer than this are refused before decoding.
    max_token_bytes: int = Field(8192, ge=256, le=65536)

    @model_validator(mode="after")
    def _check(self) -> JwtSettings:
        if self.algorithm in HMAC_ALGORITHMS:
            if self.public_key_file is not None:
                raise ValueError(
                    f"jwt.public_key_file is set but jwt.algorithm is {self.algorithm}: "
                    "use exactly one family (set REVENGE_JWT_ALGORITHM=RS256/ES256/EdDSA)"
                )
        elif self.algorithm not in ASYMMETRIC_ALGORITHMS:
            raise ValueError(
                f"jwt.algorithm {self.algorithm!r} is not supported; use one of "
                + ", ".join(HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS)
            )
        return self


class ApiSettings(_Section):
    #: Backend API keys (``Authorization: Bearer <key>``); an admin JWT also works.
    keys: list[SecretStr] = Field(default_factory=list)


class BrokerSettings(_Section):
    #: ``memory://`` (one process), ``redis://host:port/db``, or
    #: ``redis+sentinel://host1:26379,host2:26379/<master-name>/db`` (Redis Sentinel).
    url: str = "memory://"
    #: Seconds a broker call may take before it fails with UNAVAILABLE.
    timeout: float = Field(5.0, gt=0, le=60)
    #: Redis: a publication is acked only once this many replicas have it (``WAIT``);
    #: 0 acks as soon as the master has it.
    min_replicas: int = Field(0, ge=0, le=16)
    #: Redis: a node's presence entries and devices outlive its last refresh this long,
    #: so a node that died (SIGKILL) drops out of presence and device lists after it (s).
    presence_ttl: float = Field(30.0, gt=0, le=3600)
    #: Redis: how often a live node re-writes its entries (s, less than presence_ttl).
    presence_refresh: float = Field(10.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _refresh_within_ttl(self) -> BrokerSettings:
        if self.presence_refresh >= self.presence_ttl:
            raise ValueError("broker.presence_refresh must be less than broker.presence_ttl")
        return self


class StoreSettings(_Section):
    #: ``sqlite:///path`` (embedded) or ``postgresql://user@host/db``.
    url: str = "sqlite:///revenge-ws.sqlite3"


class BackendSettings(_Section):
    #: Where playback events go: the hub POSTs batches of them to this URL (contract §13);
    #: unset, none are kept or sent. ``stopped`` and item changes wait in the store's outbox
    #: until the backend answers 2xx; progress may be conflated to the newest per device.
    playback_url: str | None = None
    #: Events per POST at most.
    batch_size: int = Field(500, ge=1, le=10_000)
    #: Seconds the first event of a batch may wait for others before the batch is sent
    #: (sooner when ``batch_size`` events are waiting): about one POST per interval at most.
    batch_interval: float = Field(1.0, gt=0, le=60)
    #: Seconds one POST may take, connecting included; slower counts as a failure.
    request_timeout: float = Field(10.0, gt=0, le=300)
    #: Longest wait between retries (s); retries back off exponentially from
    #: ``batch_interval``, with jitter.
    max_backoff: float = Field(60.0, gt=0, le=3600)
    #: Devices whose newest progress is kept in memory while undelivered; past it the
    #: oldest is dropped (and counted). ``stopped`` and item changes are never dropped.
    max_progress: int = Field(10_000, ge=1, le=10_000_000)
    #: Seconds a graceful shutdown spends delivering what is left; durable events that
    #: miss it stay in the outbox for the next start.
    flush_timeout: float = Field(3.0, ge=0, le=60)

    @model_validator(mode="after")
    def _check(self) -> BackendSettings:
        url = self.playback_url
        if url is not None and url.strip() == "":
            object.__setattr__(self, "playback_url", None)  # an empty variable means unset
        elif url is not None and not url.lower().startswith(("http://", "https://")):
            raise ValueError(
                "backend.playback_url (REVENGE_BACKEND_PLAYBACK_URL) must be an http:// or "
                "https:// URL"
            )
        return self


class LimitSettings(_Section):
    message_size: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    connections_per_user: int = Field(10, ge=1)
    channels_per_connection: int = Field(128, ge=4)
    inbound_rate: float = Field(100.0, gt=0)
    inbound_burst: int = Field(200, ge=1)
    #: RATE_LIMITED errors a connection may collect before it is closed with 4004.
    rate_limit_strikes: int = Field(50, ge=1)
    outbound_queue_bytes: int = Field(1024 * 1024, ge=16 * 1024)
    #: Bounded counts where one is needed (client iterators, recovery buffers).
    send_buffer_messages: int = Field(100, ge=10)
    #: Requests in flight per connection (handlers awaiting I/O).
    inflight_requests: int = Field(32, ge=1)


class HeartbeatSettings(_Section):
    interval: float = Field(30.0, gt=0)
    timeout: float = Field(90.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> HeartbeatSettings:
        if self.timeout <= self.interval:
            raise ValueError("heartbeat.timeout must be longer than heartbeat.interval")
        return self


class HistoryFamily(_Section):
    size: int = Field(100, ge=0, le=100_000)
    ttl: float = Field(300.0, ge=0)


def _default_families() -> dict[str, HistoryFamily]:
    return {
        "notifications": HistoryFamily(size=100, ttl=3600),
        "user": HistoryFamily(size=100, ttl=300),
        "server": HistoryFamily(size=100, ttl=300),
        "library": HistoryFamily(size=100, ttl=600),
        "transcode": HistoryFamily(size=20, ttl=3600),
        "playback": HistoryFamily(size=200, ttl=600),
        "activity": HistoryFamily(size=100, ttl=300),
        "sessions": HistoryFamily(size=20, ttl=60),
    }


class HistorySettings(_Section):
    #: Per channel family: publications kept (size) and for how long (ttl, s).
    families: dict[str, HistoryFamily] = Field(default_factory=_default_families)
    #: A request id repeated within this many seconds returns the first result.
    request_dedupe_window: float = Field(300.0, ge=0)
    #: Idempotency keys of backend publishes are remembered this long (s).
    idempotency_ttl: float = Field(600.0, ge=0)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = False
    access_log: bool = True


class DebugSettings(_Section):
    #: Serve the RFC 6455 conformance echo endpoint ``/debug/echo``.
    echo: bool = False


class NotificationSettings(_Section):
    retention_days: float = Field(90, gt=0)
    critical_retention_days: float = Field(365, gt=0)
    dedupe_window: float = Field(300.0, ge=0)
    cleanup_interval: float = Field(3600.0, gt=0)


class ChannelSettings(_Section):
    #: Library item events are coalesced into one ``library.changed`` per window (s).
    library_coalesce_window: float = Field(2.0, ge=0, le=300)
    #: ``user.data_changed`` is debounced per user (s).
    user_data_debounce: float = Field(0.5, ge=0, le=60)
    #: A finished transcode job's channel is kept this long (s).
    transcode_retention: float = Field(3600.0, ge=0)


class ActivitySettings(_Section):
    #: Publish ``activity.presence`` on ``activity`` (false: no presence, for privacy).
    presence: bool = True
    #: Presence changes are coalesced into at most one publication per window (s).
    presence_window: float = Field(1.0, gt=0, le=60)
    #: A user is reported offline only after their last connection has been closed this
    #: long (s), so restarts and reconnects do not flap.
    offline_grace: float = Field(10.0, ge=0, le=3600)
    #: Users an ``activity.presence`` names at most in each list (fewer, down to 10, on a
    #: node with thousands of subscribers on ``activity``); beyond, ``more`` counts those
    #: left out (a restart of a large node must not cost N² bytes).
    presence_max_users: int = Field(100, ge=1, le=100_000)


class DevicesSettings(_Section):
    #: ``device.updated`` of one device, and ``sessions.updated`` of one node, at most once
    #: per this many seconds; the newest state wins (s).
    update_interval: float = Field(1.0, gt=0, le=60)
    #: Remote commands in flight to one device; more are refused ``RATE_LIMITED``.
    max_inflight_commands: int = Field(10, ge=1, le=1000)
    #: Devices one ``devices.list`` / ``GET /api/v1/realtime/devices`` answers at most.
    max_listed: int = Field(10_000, ge=1, le=1_000_000)


class SyncplaySettings(_Section):
    sync_threshold: float = Field(2.0, gt=0)
    min_lead_ms: float = Field(500.0, gt=0, le=5000)
    buffering_timeout_first: float = Field(60.0, gt=0)
    buffering_timeout: float = Field(10.0, gt=0)
    idle_end_hours: float = Field(24.0, gt=0)
    max_rooms: int = Field(10000, ge=1)


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    node: NodeSettings = Field(default_factory=NodeSettings)
    #: Exact origins allowed to open a WebSocket; empty = any. No Origin header always passes.
    allowed_origins: list[str] = Field(default_factory=list)
    jwt: JwtSettings = Field(default_factory=JwtSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    backend: BackendSettings = Field(default_factory=BackendSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    heartbeat: HeartbeatSettings = Field(default_factory=HeartbeatSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    debug: DebugSettings = Field(default_factory=DebugSettings)
    notifications: NotificationSettings = Field(default_factory=NotificationSettings)
    channels: ChannelSettings = Field(default_factory=ChannelSettings)
    activity: ActivitySettings = Field(default_factory=ActivitySettings)
    syncplay: SyncplaySettings = Field(default_factory=SyncplaySettings)
    devices: DevicesSettings = Field(default_factory=DevicesSettings)

    @property
    def node_id(self) -> str:
        return self.node.id

    def history_for(self, family: str) -> HistoryFamily:
        return self.history.families.get(family) or HistoryFamily()


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Map every scalar/list setting to its environment variable name."""
    out: dict[str, tuple[str, ...]] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = (*prefix, name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_leaves(ann, path))
        elif get_origin(ann) is dict:
            continue  # nested maps (history.families) are YAML-only
        else:
            out["REVENGE_" + "_".join(path).upper()] = path
    return out


_ENV = _leaves(Settings)


def env_names() -> dict[str, str]:
    """Environment variable → dotted key, for the docs and ``revenge-ws serve --help``."""
    return {env: ".".join(path) for env, path in _ENV.items()}


def _is_list(path: tuple[str, ...]) -> bool:
    model: Any = Settings
    for part in path[:-1]:
        model = model.model_fields[part].annotation
    ann = model.model_fields[path[-1]].annotation
    return get_origin(ann) is list or any(get_origin(a) is list for a in get_args(ann))


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    require_secret: bool = True,
) -> Settings:
    """Read, merge and validate the settings; raise :class:`ConfigError` naming a bad key."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if config_file is None and env.get("REVENGE_CONFIG"):
        config_file = env["REVENGE_CONFIG"]
    if config_file is not None:
        try:
            text = Path(config_file).read_text(encoding="utf-8")
            loaded = yaml.safe_load(text) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of settings")
        data = loaded
    for key, value in env.items():
        if not key.startswith("REVENGE_") or key == "REVENGE_CONFIG":
            continue
        path = _ENV.get(key)
        if path is None:
            log.warning("ignoring unknown environment variable %s", key)
            continue
        node = data
        for part in path[:-1]:
            sub = node.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"setting {'.'.join(path[:-1])} must be a mapping")
            node = sub
        parsed: Any = value
        if _is_list(path):
            parsed = [v.strip() for v in value.split(",") if v.strip()]
        elif value == "" and path[-1] in {"audience", "issuer", "secret", "public_key_file"}:
            parsed = None
        node[path[-1]] = parsed
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    if require_secret:
        check_keys(settings)
    if not settings.node.id:
        node_id = f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        settings = settings.model_copy(
            update={"node": settings.node.model_copy(update={"id": node_id})}
        )
    return settings


def check_keys(settings: Settings) -> None:
    """Refuse to run with a missing or weak signing key, saying how to set one."""
    jwt = settings.jwt
    if jwt.algorithm in HMAC_ALGORITHMS:
        secret = jwt.secret.get_secret_value() if jwt.secret else ""
        if not secret:
            raise ConfigError(
                "REVENGE_JWT_SECRET (jwt.secret) is not set. Set it to at least 32 random "
                "bytes, e.g.  export REVENGE_JWT_SECRET=$(python3 -c "
                "'import secrets; print(secrets.token_hex(32))')  "
                "or set REVENGE_JWT_PUBLIC_KEY_FILE with an asymmetric REVENGE_JWT_ALGORITHM"
            )
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"REVENGE_JWT_SECRET (jwt.secret) is {len(secret.encode())} bytes; it must be "
                f"at least {MIN_SECRET_BYTES} bytes (RFC 7518 §3.2)"
            )
    else:
        if jwt.public_key_file is None:
            raise ConfigError(
                f"jwt.algorithm is {jwt.algorithm}: set REVENGE_JWT_PUBLIC_KEY_FILE "
                "(jwt.public_key_file) to the PEM public key"
            )
        if not jwt.public_key_file.is_file():
            raise ConfigError(
                f"REVENGE_JWT_PUBLIC_KEY_FILE (jwt.public_key_file): no file {jwt.public_key_file}"
            )


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:5]:
        path = ".".join(str(p) for p in err["loc"])
        env = "REVENGE_" + path.replace(".", "_").upper()
        where = f"{path} ({env})" if env in _ENV else path
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown setting {where}")
        else:
            lines.append(f"invalid setting {where}: {err['msg']}")
    return "; ".join(lines)
