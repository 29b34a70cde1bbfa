from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Baseline(_message.Message):
    __slots__ = ("key", "service_name", "deployment_environment_name", "code_function_name", "code_file_path", "code_line_number", "otel_scope_name", "service_version", "vcs_ref_head_revision", "count", "rate_per_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "error_rate", "windows", "updated")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ENVIRONMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CODE_FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    CODE_FILE_PATH_FIELD_NUMBER: _ClassVar[int]
    CODE_LINE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    OTEL_SCOPE_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VCS_REF_HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P90_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    P999_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    key: str
    service_name: str
    deployment_environment_name: str
    code_function_name: str
    code_file_path: str
    code_line_number: str
    otel_scope_name: str
    service_version: str
    vcs_ref_head_revision: str
    count: int
    rate_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    error_rate: float
    windows: int
    updated: int
    def __init__(self, key: _Optional[str] = ..., service_name: _Optional[str] = ..., deployment_environment_name: _Optional[str] = ..., code_function_name: _Optional[str] = ..., code_file_path: _Optional[str] = ..., code_line_number: _Optional[str] = ..., otel_scope_name: _Optional[str] = ..., service_version: _Optional[str] = ..., vcs_ref_head_revision: _Optional[str] = ..., count: _Optional[int] = ..., rate_per_s: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p90_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., p999_ms: _Optional[float] = ..., error_rate: _Optional[float] = ..., windows: _Optional[int] = ..., updated: _Optional[int] = ...) -> None: ...
