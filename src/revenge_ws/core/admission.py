"""Bounds on the handshakes a node works on (contract v1.1 §12).

Pure bookkeeping, no clock and no I/O: the transport adapters call
:meth:`HandshakeGate.enter` when a handshake request has arrived, before anything about
it is looked at (not even its token), and :meth:`HandshakeGate.leave` once the
connection is open or refused.
"""

from __future__ import annotations

__all__ = ["HandshakeGate"]


class HandshakeGate:
    """At most ``limit`` handshakes in progress at once.

    During a reconnect storm the node would otherwise start the work of every client that
    knocks (token check, broker calls, the ``welcome``) and finish none of it in time:
    clients give up, come back, and the node keeps working for sockets nobody reads.
    Past the bound a client is told 503 with ``Retry-After`` at the cost of a few bytes.
    """

    __slots__ = ("limit", "pending", "refused")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.pending = 0
        #: Handshakes refused for the bound since the node started.
        self.refused = 0

    def enter(self) -> bool:
        """Take a place; False (and counted as refused) when all are taken."""
        if self.pending >= self.limit:
            self.refused += 1
            return False
        self.pending += 1
        return True

    def leave(self) -> None:
        """Give back a place taken by :meth:`enter`."""
        if self.pending > 0:
            self.pending -= 1
