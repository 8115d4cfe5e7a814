"""What the node reports about itself; the server plugs Prometheus in behind it."""

from __future__ import annotations

from typing import Protocol

__all__ = ["NullObserver", "Observer"]


class Observer(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self, code: int | None, duration: float) -> None: ...

    def message_in(self, mtype: str) -> None: ...

    def messages_out(self, mtype: str, count: int) -> None: ...

    def publish_latency(self, seconds: float) -> None: ...

    def slow_connection(self) -> None: ...

    def handshake_refused(self, code: str) -> None: ...


class NullObserver:
    """Reports nothing (unit tests, embedding)."""

    def connection_opened(self) -> None:
        pass

    def connection_closed(self, code: int | None, duration: float) -> None:
        pass

    def message_in(self, mtype: str) -> None:
        pass

    def messages_out(self, mtype: str, count: int) -> None:
        pass

    def publish_latency(self, seconds: float) -> None:
        pass

    def slow_connection(self) -> None:
        pass

    def handshake_refused(self, code: str) -> None:
        pass
