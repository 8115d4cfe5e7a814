from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest

from revenge_ws.config import Settings

from .helpers import Hub, make_settings, running_hub
from .redis_fixtures import redis_proc  # noqa: F401 - a private, restartable redis-server
from .store_fixtures import pg_database  # noqa: F401 - a private PostgreSQL database


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
async def hub(settings: Settings) -> AsyncIterator[Hub]:
    async with running_hub(settings) as h:
        yield h


@pytest.fixture
def hub_with() -> Callable[..., AbstractAsyncContextManager[Hub]]:
    """``async with hub_with({"REVENGE_LIMITS_...": "..."}) as hub:``"""

    def make(env: dict[str, str] | None = None) -> AbstractAsyncContextManager[Hub]:
        return running_hub(make_settings(env))

    return make
