"""Device request validation (contract v1.1 §13): one strict pydantic model per request,
the known remote commands' arguments, and :func:`validate`, which turns a refusal into
``INVALID_MESSAGE`` naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..codes import ErrorCode
from ..exceptions import RequestError

__all__ = [
    "COMMAND_ARGS",
    "DEFAULT_TIMEOUT_MS",
    "MAX_TIMEOUT_MS",
    "Hello",
    "ListReq",
    "PlaybackUpdate",
    "RemoteCommandReq",
    "RemoteResultReq",
    "validate",
    "validate_command",
]

#: A remote command waits this long for the device's result by default, and at most (ms).
DEFAULT_TIMEOUT_MS = 10_000
MAX_TIMEOUT_MS = 60_000
#: Positions and durations beyond a week are a client bug, not a film (s).
MAX_POSITION = 7 * 24 * 3600.0


class Req(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


_Id = Annotated[str, Field(min_length=1, max_length=128)]
_Pos = Annotated[float, Field(ge=0.0, le=MAX_POSITION)]
_Name = Annotated[str, Field(min_length=1, max_length=100)]
_CommandName = Annotated[str, Field(min_length=1, max_length=64)]


class Capabilities(Req):
    remote_control: bool = False
    commands: Annotated[list[_CommandName], Field(max_length=64)] = []


class Hello(Req):
    device_id: _Id
    name: _Name
    client: _Name
    version: Annotated[str, Field(max_length=50)] = ""
    capabilities: Capabilities = Capabilities()


class PlaybackUpdate(Req):
    item_id: _Id
    item_type: Annotated[str, Field(min_length=1, max_length=50)] | None = None
    title: Annotated[str, Field(max_length=300)] | None = None
    state: Literal["playing", "paused", "buffering", "stopped"]
    position: _Pos
    duration: _Pos | None = None
    rate: Annotated[float, Field(ge=0.25, le=4.0)] = 1.0
    volume: Annotated[float, Field(ge=0, le=100)] | None = None
    muted: bool | None = None
    play_method: Literal["direct", "transcode"] | None = None
    transcode_job_id: _Id | None = None
    room_id: _Id | None = None


class RemoteCommandReq(Req):
    device_id: _Id
    user_id: _Id | None = None
    command: _CommandName
    args: dict[str, Any] = {}
    timeout_ms: Annotated[int, Field(ge=1, le=MAX_TIMEOUT_MS)] = DEFAULT_TIMEOUT_MS


class RemoteResultReq(Req):
    command_id: Annotated[str, Field(min_length=1, max_length=64)]
    ok: bool
    error: Annotated[str, Field(max_length=500)] | None = None
    state: dict[str, Any] | None = None


class ListReq(Req):
    user_id: _Id | None = None
    all: bool = False


# -- the known commands' arguments ---------------------------------------------------------
class _NoArgs(Req):
    pass


class PlayArgs(Req):
    item_ids: Annotated[list[_Id], Field(min_length=1, max_length=500)]
    start_position: _Pos | None = None
    mode: Literal["now", "next", "last"] = "now"


class SeekArgs(Req):
    position: _Pos


class VolumeArgs(Req):
    volume: Annotated[int, Field(ge=0, le=100)]


class MessageArgs(Req):
    header: Annotated[str, Field(max_length=100)] | None = None
    text: Annotated[str, Field(min_length=1, max_length=500)]
    timeout_ms: Annotated[int, Field(ge=1, le=MAX_TIMEOUT_MS * 10)] | None = None


#: The commands the hub validates; ``x-`` commands are the device's own.
COMMAND_ARGS: dict[str, type[Req]] = {
    "play": PlayArgs,
    "pause": _NoArgs,
    "unpause": _NoArgs,
    "toggle_pause": _NoArgs,
    "stop": _NoArgs,
    "seek": SeekArgs,
    "next": _NoArgs,
    "previous": _NoArgs,
    "set_volume": VolumeArgs,
    "mute": _NoArgs,
    "unmute": _NoArgs,
    "display_message": MessageArgs,
}

M = TypeVar("M", bound=Req)


def validate(model: type[M], data: Mapping[str, Any], where: str = "") -> M:
    """``data`` as ``model``, or ``RequestError(INVALID_MESSAGE)`` naming the bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "data"
        raise RequestError(ErrorCode.INVALID_MESSAGE, f"{where}{field}: {err['msg']}") from None


def validate_command(command: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments of a known command, normalized (defaults filled in, unknown fields
    dropped); an ``x-`` command's arguments pass as they are. ``INVALID_MESSAGE`` for an
    unknown command or bad arguments."""
    if command.startswith("x-"):
        return dict(args)
    model = COMMAND_ARGS.get(command)
    if model is None:
        raise RequestError(
            ErrorCode.INVALID_MESSAGE,
            f"unknown command {command!r} (known: {', '.join(COMMAND_ARGS)}, or x-...)",
        )
    return validate(model, args, "args.").model_dump(exclude_none=True)
