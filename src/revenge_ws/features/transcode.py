"""Transcoding progress (contract §3, §9): ``POST /api/v1/realtime/transcode/{job_id}``.

The job's owner is recorded on its first event (cluster-wide, in the broker); the owner's
open connections are subscribed on every node and get the latest value at once. Progress
is a latest-value channel: slow readers get the newest value, not a backlog. A finished
job's channel is ended after ``channels.transcode_retention`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..auth import Claims
from ..codes import ErrorCode
from ..core.channels import Family, parse_channel
from ..core.control import EndChannel, SubscribeUser
from ..core.node import Node
from ..exceptions import RequestError
from .web import backend_auth, json_body, json_response, op, path_param

__all__ = ["TranscodeBody", "install"]

log = logging.getLogger("revenge_ws.transcode")
TYPES = ("transcode.progress", "transcode.complete", "transcode.error")
#: An owner record outlives a job that stops reporting (s).
OWNER_TTL = 24 * 3600.0


class TranscodeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Field(min_length=1, max_length=128)
    type: str = Field(pattern="^transcode\\.(progress|complete|error)$")
    data: dict[str, Any] = Field(default_factory=dict)


def owner_key(job_id: str) -> str:
    return f"job-owner:{job_id}"


class Transcode:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def may_subscribe(self, claims: Claims, job_id: str) -> bool:
        owner = await self.node.call(self.node.broker.get_value(owner_key(job_id)))
        return owner == claims.sub

    async def event(self, job_id: str, body: TranscodeBody) -> dict[str, Any]:
        node = self.node
        channel = parse_channel(f"transcode:{job_id}").name
        previous = await node.call(
            node.broker.set_if_absent(owner_key(job_id), body.user_id, OWNER_TTL)
        )
        if previous is not None and previous != body.user_id:
            raise RequestError(ErrorCode.CONFLICT, f"job {job_id} belongs to another user")
        data = {"job_id": job_id, **body.data}
        pub = await node.publish(channel, body.type, data)
        if previous is None:
            # First event: subscribe the owner's connections everywhere; they get this
            # publication as the channel's latest value.
            await node.send_control(SubscribeUser(body.user_id, channel))
        if body.type != "transcode.progress":
            retention = node.settings.channels.transcode_retention
            await node.call(node.broker.set_value(owner_key(job_id), body.user_id, retention + 1))
            node.spawn(self._end_later(channel, retention), name=f"end-{channel}")
        return {"channel": channel, "seq": pub.seq, "epoch": pub.epoch}

    async def _end_later(self, channel: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.node.send_control(EndChannel(channel))

    async def http_event(self, request: web.Request) -> web.Response:
        backend_auth(request)
        body = await json_body(request, TranscodeBody)
        return json_response(await self.event(request.match_info["job_id"], body))


def install(node: Node, app: web.Application) -> Transcode:
    feature = Transcode(node)
    node.policy.set_checker(Family.TRANSCODE, feature.may_subscribe)
    app.router.add_post("/api/v1/realtime/transcode/{job_id}", feature.http_event)
    return feature


def openapi_paths() -> dict[str, Any]:
    """This feature's HTTP routes, for ``/api/v1/openapi.json``."""
    return {
        "/api/v1/realtime/transcode/{job_id}": {
            "post": op(
                "A transcoding job's event (progress, complete, error)",
                security="backend",
                body="TranscodeBody",
                params=[path_param("job_id")],
                errors=(400, 401, 403, 409, 503),
            )
        },
    }


#: The request bodies :func:`openapi_paths` names.
OPENAPI_MODELS: dict[str, type[BaseModel]] = {"TranscodeBody": TranscodeBody}
