"""A typed helper for the media server's backend: publish into the hub over HTTP.

Retries transient failures (connection errors, 503, 429) with backoff; every call that
changes something carries an idempotency key, so a retry never acts twice. A refusal
raises :class:`~revenge_ws.exceptions.PublishError` with the contract's ``code``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from .exceptions import PublishError

__all__ = ["Publisher"]

_RETRY_STATUS = frozenset({429, 502, 503, 504})


class Publisher:
    """``async with Publisher("http://127.0.0.1:8080", api_key=...) as pub: ...``"""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retries = retries
        self._backoff = backoff
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Publisher:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One API call with retries; returns the JSON answer."""
        if self._session is None:
            raise RuntimeError("use 'async with Publisher(...)'")
        data = orjson.dumps(body) if body is not None else None
        last: PublishError | None = None
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                async with self._session.request(
                    method,
                    self.base_url + path,
                    data=data,
                    headers={"Content-Type": "application/json"} if data else None,
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = PublishError(0, "UNAVAILABLE", f"cannot reach the hub: {exc}")
                continue
            try:
                answer = orjson.loads(raw) if raw else {}
            except orjson.JSONDecodeError:
                answer = {}
            if status < 300:
                return answer if isinstance(answer, dict) else {"result": answer}
            err = answer.get("error", {}) if isinstance(answer, dict) else {}
            last = PublishError(status, err.get("code", "INTERNAL"), err.get("message", ""))
            if status not in _RETRY_STATUS:
                break
        assert last is not None
        raise last

    async def publish(
        self, channel: str, mtype: str, data: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Publish on a channel; returns ``{channel, seq, epoch}``."""
        return await self.request(
            "POST",
            "/api/v1/realtime/publish",
            {
                "channel": channel,
                "type": mtype,
                "data": data,
                "idempotency_key": idempotency_key or uuid.uuid4().hex,
            },
        )

    async def disconnect(self, user_id: str, code: int = 4503, reason: str = "") -> None:
        await self.request(
            "POST",
            "/api/v1/realtime/disconnect",
            {"user_id": user_id, "code": code, "reason": reason},
        )

    async def revoke(self, user_id: str) -> None:
        await self.request("POST", "/api/v1/realtime/revoke", {"user_id": user_id})

    async def info(self) -> dict[str, Any]:
        return await self.request("GET", "/api/v1/realtime/info")
