"""The ``revenge-ws`` command: ``serve``, ``token``, ``tail``, ``publish``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from .exceptions import ClientError, ConfigError, RevengeError

__all__ = ["main"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` → seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 15m, 1h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _base_url(args: argparse.Namespace, settings: Any) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    host = settings.server.host if settings.server.host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    return f"http://{host}:{settings.server.port}"


def _settings(args: argparse.Namespace, *, require_secret: bool = True) -> Any:
    from .config import load_settings

    return load_settings(args.config, require_secret=require_secret)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import run

    settings = _settings(args)
    if args.host or args.port is not None:
        server = settings.server.model_copy(
            update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        )
        settings = settings.model_copy(update={"server": server})
    run(settings)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from .auth import mint_token

    settings = _settings(args)
    libraries = [x for x in args.libraries.split(",") if x] if args.libraries is not None else None
    print(
        mint_token(
            settings.jwt,
            args.sub,
            role=args.role,
            name=args.name,
            libraries=libraries,
            ttl=args.ttl,
        )
    )
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from .client import Client

    settings = _settings(args, require_secret=False)
    token = args.token or os.environ.get("REVENGE_TOKEN")
    if not token:
        from .auth import mint_token
        from .config import check_keys

        check_keys(settings)
        token = mint_token(settings.jwt, args.sub, role=args.role, ttl=3600)
    url = _base_url(args, settings).replace("http", "ws", 1) + "/api/v1/ws"

    async def go() -> None:
        async with Client(url, token=token) as client:
            if args.channel:
                await client.subscribe(*args.channel)
            count = 0
            async for msg in client.messages():
                sys.stdout.write(orjson.dumps(msg).decode() + "\n")
                sys.stdout.flush()
                count += 1
                if args.count and count >= args.count:
                    return

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from .publisher import Publisher

    settings = _settings(args, require_secret=False)
    key = args.api_key or os.environ.get("REVENGE_API_KEY")
    if not key and settings.api.keys:
        key = settings.api.keys[0].get_secret_value()
    if not key:
        from .auth import mint_token
        from .config import check_keys

        check_keys(settings)
        key = mint_token(settings.jwt, "revenge-ws-cli", role="admin", ttl=300)
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"--data is not JSON: {exc}") from None

    async def go() -> dict[str, Any]:
        async with Publisher(_base_url(args, settings), api_key=key) as pub:
            return await pub.publish(args.channel, args.type, data)

    print(orjson.dumps(asyncio.run(go())).decode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revenge-ws", description="The real-time hub of a self-hosted media server."
    )
    parser.add_argument("--config", help="YAML settings file (the environment wins)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the hub")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="print a development token signed with the configured key")
    p.add_argument("--sub", required=True, help="user id")
    p.add_argument("--role", choices=("user", "admin"), default="user")
    p.add_argument("--name")
    p.add_argument("--libraries", help="comma-separated library ids (absent = all)")
    p.add_argument("--ttl", type=parse_duration, default=3600.0, help="e.g. 15m, 1h (default)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("tail", help="connect and print what arrives (one JSON per line)")
    p.add_argument("--url", help="hub base URL (default from settings)")
    p.add_argument("--token", help="a JWT (default: $REVENGE_TOKEN or minted for --sub)")
    p.add_argument("--sub", default="cli", help="user id for a minted token")
    p.add_argument("--role", choices=("user", "admin"), default="user")
    p.add_argument("--channel", action="append", help="extra channel to subscribe (repeat)")
    p.add_argument("--count", type=int, default=0, help="exit after this many messages")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("publish", help="publish on a channel through the backend API")
    p.add_argument("channel")
    p.add_argument("type")
    p.add_argument("--data", default="{}", help="JSON object")
    p.add_argument("--url", help="hub base URL (default from settings)")
    p.add_argument(
        "--api-key",
        help="API key (default: $REVENGE_API_KEY, first of REVENGE_API_KEYS, or an admin token)",
    )
    p.set_defaults(func=cmd_publish)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"revenge-ws: configuration error: {exc}", file=sys.stderr)
        return 2
    except (ClientError, RevengeError, OSError) as exc:
        print(f"revenge-ws: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
