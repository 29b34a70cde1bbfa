from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Verdict(_message.Message):
    __slots__ = ("environment", "service", "version", "revision", "previous", "previous_revision", "verdict", "reasons", "missing", "milestone", "share", "state", "calls", "started", "updated")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_REVISION_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    MILESTONE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    environment: str
    service: str
    version: str
    revision: str
    previous: str
    previous_revision: str
    verdict: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    milestone: str
    share: float
    state: str
    calls: int
    started: int
    updated: int
    def __init__(self, environment: _Optional[str] = ..., service: _Optional[str] = ..., version: _Optional[str] = ..., revision: _Optional[str] = ..., previous: _Optional[str] = ..., previous_revision: _Optional[str] = ..., verdict: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., milestone: _Optional[str] = ..., share: _Optional[float] = ..., state: _Optional[str] = ..., calls: _Optional[int] = ..., started: _Optional[int] = ..., updated: _Optional[int] = ...) -> None: ...
