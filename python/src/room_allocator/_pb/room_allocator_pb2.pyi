from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfo(_message.Message):
    __slots__ = ("prefill_worker", "dp_size", "rooms_issued")
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOMS_ISSUED_FIELD_NUMBER: _ClassVar[int]
    prefill_worker: str
    dp_size: int
    rooms_issued: int
    def __init__(self, prefill_worker: _Optional[str] = ..., dp_size: _Optional[int] = ..., rooms_issued: _Optional[int] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("prefill_worker", "dp_size")
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    prefill_worker: str
    dp_size: int
    def __init__(self, prefill_worker: _Optional[str] = ..., dp_size: _Optional[int] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class AllocateRoomRequest(_message.Message):
    __slots__ = ("prefill_worker", "dp_rank", "dp_size")
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    prefill_worker: str
    dp_rank: int
    dp_size: int
    def __init__(self, prefill_worker: _Optional[str] = ..., dp_rank: _Optional[int] = ..., dp_size: _Optional[int] = ...) -> None: ...

class AllocateRoomResponse(_message.Message):
    __slots__ = ("room", "dp_size")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    room: int
    dp_size: int
    def __init__(self, room: _Optional[int] = ..., dp_size: _Optional[int] = ...) -> None: ...

class LeaseRoomsRequest(_message.Message):
    __slots__ = ("prefill_worker", "count", "dp_size")
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    prefill_worker: str
    count: int
    dp_size: int
    def __init__(self, prefill_worker: _Optional[str] = ..., count: _Optional[int] = ..., dp_size: _Optional[int] = ...) -> None: ...

class LeaseRoomsResponse(_message.Message):
    __slots__ = ("first_base", "count", "dp_size", "valid_for_ms")
    FIRST_BASE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALID_FOR_MS_FIELD_NUMBER: _ClassVar[int]
    first_base: int
    count: int
    dp_size: int
    valid_for_ms: int
    def __init__(self, first_base: _Optional[int] = ..., count: _Optional[int] = ..., dp_size: _Optional[int] = ..., valid_for_ms: _Optional[int] = ...) -> None: ...

class ResolveRankRequest(_message.Message):
    __slots__ = ("room",)
    ROOM_FIELD_NUMBER: _ClassVar[int]
    room: int
    def __init__(self, room: _Optional[int] = ...) -> None: ...

class ResolveRankResponse(_message.Message):
    __slots__ = ("prefill_worker", "dp_rank", "dp_size")
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    DP_SIZE_FIELD_NUMBER: _ClassVar[int]
    prefill_worker: str
    dp_rank: int
    dp_size: int
    def __init__(self, prefill_worker: _Optional[str] = ..., dp_rank: _Optional[int] = ..., dp_size: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "next_page_token")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    next_page_token: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("prefill_worker",)
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    prefill_worker: str
    def __init__(self, prefill_worker: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRoomSpaceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoomSpace(_message.Message):
    __slots__ = ("min_room", "max_room")
    MIN_ROOM_FIELD_NUMBER: _ClassVar[int]
    MAX_ROOM_FIELD_NUMBER: _ClassVar[int]
    min_room: int
    max_room: int
    def __init__(self, min_room: _Optional[int] = ..., max_room: _Optional[int] = ...) -> None: ...
