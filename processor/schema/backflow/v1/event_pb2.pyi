from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("id", "type", "key", "service_name", "deployment_environment_name", "code_function_name", "code_file_path", "code_line_number", "otel_scope_name", "service_version", "vcs_ref_head_revision", "window_start", "window_end", "severity", "summary", "detail", "owners")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_ENVIRONMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CODE_FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    CODE_FILE_PATH_FIELD_NUMBER: _ClassVar[int]
    CODE_LINE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    OTEL_SCOPE_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VCS_REF_HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    key: str
    service_name: str
    deployment_environment_name: str
    code_function_name: str
    code_file_path: str
    code_line_number: str
    otel_scope_name: str
    service_version: str
    vcs_ref_head_revision: str
    window_start: int
    window_end: int
    severity: str
    summary: str
    detail: str
    owners: str
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., key: _Optional[str] = ..., service_name: _Optional[str] = ..., deployment_environment_name: _Optional[str] = ..., code_function_name: _Optional[str] = ..., code_file_path: _Optional[str] = ..., code_line_number: _Optional[str] = ..., otel_scope_name: _Optional[str] = ..., service_version: _Optional[str] = ..., vcs_ref_head_revision: _Optional[str] = ..., window_start: _Optional[int] = ..., window_end: _Optional[int] = ..., severity: _Optional[str] = ..., summary: _Optional[str] = ..., detail: _Optional[str] = ..., owners: _Optional[str] = ...) -> None: ...
