"""A connection's bounded outbound queue, sans I/O.

Frames are already WebSocket frames (a publication is framed once for every recipient).
The queue is bounded in bytes; a push that would exceed the bound is refused and the
caller closes the connection with 4002 (slow consumer) — nothing else is affected.
Latest-value frames (``transcode.progress``) replace the queued frame of the same key
instead of queuing behind it, so a slow reader gets the newest value, not a backlog.
"""

from __future__ import annotations

__all__ = ["Outbox"]


class Outbox:
    """FIFO of frames with byte accounting and per-key conflation."""

    __slots__ = ("_frames", "_head", "_slots", "limit", "nbytes")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.nbytes = 0
        # A list, not a deque: an empty deque costs ~760 bytes and most connections
        # are idle with nothing queued; a full drain swaps the list out instead.
        self._frames: list[bytes] = []
        # Conflation key -> absolute index of its frame; absolute = position + _head.
        self._slots: dict[str, int] = {}
        self._head = 0

    def __len__(self) -> int:
        """How many frames are queued (an empty outbox is falsy)."""
        return len(self._frames)

    def push(self, frame: bytes, *, extra: int = 0) -> bool:
        """Queue a frame; False when ``nbytes + extra`` (bytes the transport still
        holds) would pass the limit — the caller must treat the reader as slow."""
        if self.nbytes + len(frame) + extra > self.limit:
            return False
        self._frames.append(frame)
        self.nbytes += len(frame)
        return True

    def append(self, frame: bytes) -> None:
        """Queue a frame the caller knows fits (far below the limit)."""
        self._frames.append(frame)
        self.nbytes += len(frame)

    def pop_one(self) -> bytes:
        """Remove and return the only queued frame."""
        frame = self._frames.pop()
        self._head += 1
        self.nbytes = 0
        if self._slots:
            self._slots.clear()
        return frame

    def push_latest(self, key: str, frame: bytes, *, extra: int = 0) -> bool:
        """Queue a latest-value frame, replacing a still-queued one of the same key."""
        pos = self._slots.get(key)
        if pos is not None:
            i = pos - self._head
            old = self._frames[i]
            if self.nbytes - len(old) + len(frame) + extra > self.limit:
                return False
            self._frames[i] = frame
            self.nbytes += len(frame) - len(old)
            return True
        if not self.push(frame, extra=extra):
            return False
        self._slots[key] = self._head + len(self._frames) - 1
        return True

    def barrier(self, key: str) -> None:
        """A non-conflatable frame of ``key`` was queued: later values must queue behind it.

        Cheap when nothing latest-value is queued (the common case in a fan-out loop)."""
        if self._slots:
            self._slots.pop(key, None)

    def drain(self, max_bytes: int | None = None) -> list[bytes]:
        """Remove and return queued frames, oldest first, up to about ``max_bytes``."""
        if max_bytes is None or self.nbytes <= max_bytes:
            out = self._frames
            self._frames = []
            self._head += len(out)
            if self._slots:
                self._slots.clear()
            self.nbytes = 0
            return out
        frames = self._frames
        n = 0
        taken = 0
        while n < len(frames) and (taken < max_bytes or n == 0):
            taken += len(frames[n])
            n += 1
        out = frames[:n]
        del frames[:n]
        self._head += n
        self.nbytes -= taken
        if self._slots:
            self._slots = {k: v for k, v in self._slots.items() if v >= self._head}
        return out
