"""The ``activity`` channel and ``server.shutdown``.

``activity.user_online``/``offline`` follow a user's first connection cluster-wide and
their last disconnection (not every connection), from the broker's presence counts.
"""

from __future__ import annotations

from ..core.connection import Connection
from ..core.node import Node

__all__ = ["install"]


def install(node: Node) -> None:
    async def online(conn: Connection) -> None:
        await node.publish(
            "activity",
            "activity.user_online",
            {"user_id": conn.user_id, "name": conn.claims.display_name},
        )

    async def offline(conn: Connection) -> None:
        await node.publish(
            "activity",
            "activity.user_offline",
            {"user_id": conn.user_id, "name": conn.claims.display_name},
        )

    async def shutdown() -> None:
        # Admins see the node go (contract §3: server.shutdown on the server channel).
        await node.publish(
            "server", "server.shutdown", {"node_id": node.node_id, "reason": "restart"}
        )

    node.on_user_online.append(online)
    node.on_stop.append(shutdown)
    node.on_user_offline.append(offline)
