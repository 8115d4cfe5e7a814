"""SyncPlay request validation: one strict pydantic model per request type, and
:func:`validate`, which turns a refusal into ``INVALID_MESSAGE`` naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..codes import ErrorCode
from ..exceptions import RequestError
from .model import MAX_POSITION, MAX_RTT_MS, SHARED

# --------------------------------------------------------------------------- request schemas


class Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


_Id = Annotated[str, Field(min_length=1, max_length=128)]
_Pos = Annotated[float, Field(ge=0.0, le=MAX_POSITION)]
_Rtt = Annotated[float, Field(ge=0.0, le=MAX_RTT_MS)]
_Seq = Annotated[int, Field(ge=0)]


class Content(Req):
    type: Literal["movie", "episode"]
    id: Annotated[str, Field(min_length=1, max_length=200)]


class RoomReq(Req):
    room_id: _Id


class ControlReq(RoomReq):
    command_seq: _Seq | None = None


class CreateReq(Req):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    content: Content
    public: bool = False
    password: Annotated[str, Field(max_length=256)] | None = None
    max_participants: Annotated[int, Field(ge=1)] | None = None
    control_mode: Literal["shared", "leader_only"] = SHARED


class JoinReq(Req):
    room_id: _Id | None = None
    password: Annotated[str, Field(max_length=256)] | None = None
    invite_code: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    rtt_ms: _Rtt | None = None

    @model_validator(mode="after")
    def _room_or_code(self) -> JoinReq:
        if self.room_id is None and self.invite_code is None:
            raise ValueError("'room_id' or 'invite_code' is required")
        return self


class UserReq(RoomReq):
    user_id: _Id


class UpdateReq(RoomReq):
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    public: bool | None = None
    password: Annotated[str, Field(max_length=256)] | None = None
    max_participants: Annotated[int, Field(ge=1)] | None = None
    control_mode: Literal["shared", "leader_only"] | None = None
    can_control: Annotated[dict[_Id, bool], Field(max_length=1000)] | None = None


class InviteReq(RoomReq):
    user_id: _Id | None = None


class ChatReq(RoomReq):
    message: Annotated[str, Field(min_length=1, max_length=100_000)]


class PauseReq(ControlReq):
    position: _Pos | None = None


class SeekReq(ControlReq):
    position: _Pos


class RateReq(ControlReq):
    rate: Annotated[float, Field(ge=0.25, le=2.0)]


class SetContentReq(ControlReq):
    content: Content


class PositionReq(RoomReq):
    position: _Pos | None = None


class IgnoreWaitReq(RoomReq):
    ignore: bool


class ReportReq(RoomReq):
    position: _Pos
    is_playing: bool
    is_buffering: bool = False
    rtt_ms: _Rtt | None = None
    command_seq: _Seq | None = None


def validate(model: type[Req], data: object, rtype: str) -> Any:
    if not isinstance(data, Mapping):
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"syncplay.{rtype}: 'data' must be an object")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"invalid '{loc}'" if loc else "invalid data"
        raise RequestError(
            ErrorCode.INVALID_MESSAGE, f"syncplay.{rtype}: {where}: {err['msg']}"
        ) from None
