from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Callee(_message.Message):
    __slots__ = ("key", "function", "service_name", "code_file_path", "code_line_number", "calls", "calls_per_call", "ms_per_call", "time_share", "versions", "updated")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    CODE_FILE_PATH_FIELD_NUMBER: _ClassVar[int]
    CODE_LINE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CALLS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    MS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    TIME_SHARE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    key: str
    function: str
    service_name: str
    code_file_path: str
    code_line_number: str
    calls: int
    calls_per_call: float
    ms_per_call: float
    time_share: float
    versions: _containers.ScalarMap[str, float]
    updated: int
    def __init__(self, key: _Optional[str] = ..., function: _Optional[str] = ..., service_name: _Optional[str] = ..., code_file_path: _Optional[str] = ..., code_line_number: _Optional[str] = ..., calls: _Optional[int] = ..., calls_per_call: _Optional[float] = ..., ms_per_call: _Optional[float] = ..., time_share: _Optional[float] = ..., versions: _Optional[_Mapping[str, float]] = ..., updated: _Optional[int] = ...) -> None: ...

class Edges(_message.Message):
    __slots__ = ("key", "function", "service_name", "calls", "ms_per_call", "self_ms_per_call", "updated", "callees")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    MS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    SELF_MS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    CALLEES_FIELD_NUMBER: _ClassVar[int]
    key: str
    function: str
    service_name: str
    calls: int
    ms_per_call: float
    self_ms_per_call: float
    updated: int
    callees: _containers.RepeatedCompositeFieldContainer[Callee]
    def __init__(self, key: _Optional[str] = ..., function: _Optional[str] = ..., service_name: _Optional[str] = ..., calls: _Optional[int] = ..., ms_per_call: _Optional[float] = ..., self_ms_per_call: _Optional[float] = ..., updated: _Optional[int] = ..., callees: _Optional[_Iterable[_Union[Callee, _Mapping]]] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("key", "function", "service_name", "calls", "calls_per_call", "time_share", "updated")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    CALLS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    TIME_SHARE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    key: str
    function: str
    service_name: str
    calls: int
    calls_per_call: float
    time_share: float
    updated: int
    def __init__(self, key: _Optional[str] = ..., function: _Optional[str] = ..., service_name: _Optional[str] = ..., calls: _Optional[int] = ..., calls_per_call: _Optional[float] = ..., time_share: _Optional[float] = ..., updated: _Optional[int] = ...) -> None: ...
