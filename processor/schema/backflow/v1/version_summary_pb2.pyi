from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionSummary(_message.Message):
    __slots__ = ("service_version", "vcs_ref_head_revision", "calls", "errors", "windows", "seconds", "p50_ms", "p99_ms", "first", "last")
    SERVICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VCS_REF_HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    service_version: str
    vcs_ref_head_revision: str
    calls: int
    errors: int
    windows: int
    seconds: float
    p50_ms: float
    p99_ms: float
    first: int
    last: int
    def __init__(self, service_version: _Optional[str] = ..., vcs_ref_head_revision: _Optional[str] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., windows: _Optional[int] = ..., seconds: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class VersionSummaries(_message.Message):
    __slots__ = ("key", "versions")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    key: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionSummary]
    def __init__(self, key: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionSummary, _Mapping]]] = ...) -> None: ...
