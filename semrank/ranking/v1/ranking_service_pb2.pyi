import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Device(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_UNSPECIFIED: _ClassVar[Device]
    DEVICE_DESKTOP: _ClassVar[Device]
    DEVICE_MOBILE: _ClassVar[Device]
    DEVICE_TABLET: _ClassVar[Device]
    DEVICE_APP: _ClassVar[Device]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_IMPRESSION: _ClassVar[EventType]
    EVENT_TYPE_CLICK: _ClassVar[EventType]
    EVENT_TYPE_ADD_TO_CART: _ClassVar[EventType]
    EVENT_TYPE_PURCHASE: _ClassVar[EventType]
DEVICE_UNSPECIFIED: Device
DEVICE_DESKTOP: Device
DEVICE_MOBILE: Device
DEVICE_TABLET: Device
DEVICE_APP: Device
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_IMPRESSION: EventType
EVENT_TYPE_CLICK: EventType
EVENT_TYPE_ADD_TO_CART: EventType
EVENT_TYPE_PURCHASE: EventType

class RankCandidate(_message.Message):
    __slots__ = ("item_id", "title", "description", "category", "price", "brand")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    title: str
    description: str
    category: str
    price: float
    brand: str
    def __init__(self, item_id: _Optional[str] = ..., title: _Optional[str] = ..., description: _Optional[str] = ..., category: _Optional[str] = ..., price: _Optional[float] = ..., brand: _Optional[str] = ...) -> None: ...

class RankContext(_message.Message):
    __slots__ = ("query", "page", "device", "client_time")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_FIELD_NUMBER: _ClassVar[int]
    query: str
    page: str
    device: Device
    client_time: _timestamp_pb2.Timestamp
    def __init__(self, query: _Optional[str] = ..., page: _Optional[str] = ..., device: _Optional[_Union[Device, str]] = ..., client_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "candidates", "top_k", "context", "explain", "min_sequence")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    MIN_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    candidates: _containers.RepeatedCompositeFieldContainer[RankCandidate]
    top_k: int
    context: RankContext
    explain: bool
    min_sequence: int
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[RankCandidate, _Mapping]]] = ..., top_k: _Optional[int] = ..., context: _Optional[_Union[RankContext, _Mapping]] = ..., explain: _Optional[bool] = ..., min_sequence: _Optional[int] = ...) -> None: ...

class FamilyContribution(_message.Message):
    __slots__ = ("family", "contribution")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    family: str
    contribution: float
    def __init__(self, family: _Optional[str] = ..., contribution: _Optional[float] = ...) -> None: ...

class RankedItem(_message.Message):
    __slots__ = ("item_id", "score", "rank", "contributions")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    rank: int
    contributions: _containers.RepeatedCompositeFieldContainer[FamilyContribution]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., contributions: _Optional[_Iterable[_Union[FamilyContribution, _Mapping]]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("request_id", "items", "model_version", "missing_ids", "experiment", "variant", "degraded", "degraded_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[RankedItem]
    model_version: str
    missing_ids: _containers.RepeatedScalarFieldContainer[str]
    experiment: str
    variant: str
    degraded: bool
    degraded_reason: str
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[RankedItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., missing_ids: _Optional[_Iterable[str]] = ..., experiment: _Optional[str] = ..., variant: _Optional[str] = ..., degraded: _Optional[bool] = ..., degraded_reason: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "ts", "user_id", "item_id", "type", "request_id", "position")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    ts: _timestamp_pb2.Timestamp
    user_id: str
    item_id: str
    type: EventType
    request_id: str
    position: int
    def __init__(self, event_id: _Optional[str] = ..., ts: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., request_id: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class LogEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class EventRejection(_message.Message):
    __slots__ = ("index", "event_id", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    event_id: str
    reason: str
    def __init__(self, index: _Optional[int] = ..., event_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LogEventsResponse(_message.Message):
    __slots__ = ("accepted", "rejected", "rejections", "duplicates", "sequence")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[EventRejection]
    duplicates: int
    sequence: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[EventRejection, _Mapping]]] = ..., duplicates: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RankCandidate]
    def __init__(self, items: _Optional[_Iterable[_Union[RankCandidate, _Mapping]]] = ...) -> None: ...

class ItemRejection(_message.Message):
    __slots__ = ("index", "item_id", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    item_id: str
    reason: str
    def __init__(self, index: _Optional[int] = ..., item_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("accepted", "rejected", "rejections", "sequence")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    rejections: _containers.RepeatedCompositeFieldContainer[ItemRejection]
    sequence: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., rejections: _Optional[_Iterable[_Union[ItemRejection, _Mapping]]] = ..., sequence: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BundleInfo(_message.Message):
    __slots__ = ("version", "path", "loaded_at", "encoder", "feature_names", "manifest_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    path: str
    loaded_at: _timestamp_pb2.Timestamp
    encoder: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    manifest_json: str
    def __init__(self, version: _Optional[str] = ..., path: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., encoder: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class VariantInfo(_message.Message):
    __slots__ = ("name", "share", "bundle_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    share: float
    bundle_version: str
    def __init__(self, name: _Optional[str] = ..., share: _Optional[float] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class ExperimentInfo(_message.Message):
    __slots__ = ("name", "variants", "start", "end", "active")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    variants: _containers.RepeatedCompositeFieldContainer[VariantInfo]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    active: bool
    def __init__(self, name: _Optional[str] = ..., variants: _Optional[_Iterable[_Union[VariantInfo, _Mapping]]] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("bundle", "variant_bundles", "experiments", "max_candidates", "max_text_chars", "items")
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_BUNDLES_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    bundle: BundleInfo
    variant_bundles: _containers.RepeatedCompositeFieldContainer[BundleInfo]
    experiments: _containers.RepeatedCompositeFieldContainer[ExperimentInfo]
    max_candidates: int
    max_text_chars: int
    items: int
    def __init__(self, bundle: _Optional[_Union[BundleInfo, _Mapping]] = ..., variant_bundles: _Optional[_Iterable[_Union[BundleInfo, _Mapping]]] = ..., experiments: _Optional[_Iterable[_Union[ExperimentInfo, _Mapping]]] = ..., max_candidates: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., items: _Optional[int] = ...) -> None: ...

class ReloadBundleRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ReloadBundleResponse(_message.Message):
    __slots__ = ("reloaded", "version", "message")
    RELOADED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reloaded: bool
    version: str
    message: str
    def __init__(self, reloaded: _Optional[bool] = ..., version: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_ids", "requested_by")
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    requested_by: str
    def __init__(self, user_ids: _Optional[_Iterable[str]] = ..., requested_by: _Optional[str] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ("users", "events_erased", "exposures_erased", "data_events", "events_caught_up", "seconds")
    USERS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_ERASED_FIELD_NUMBER: _ClassVar[int]
    EXPOSURES_ERASED_FIELD_NUMBER: _ClassVar[int]
    DATA_EVENTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    users: int
    events_erased: int
    exposures_erased: int
    data_events: int
    events_caught_up: int
    seconds: float
    def __init__(self, users: _Optional[int] = ..., events_erased: _Optional[int] = ..., exposures_erased: _Optional[int] = ..., data_events: _Optional[int] = ..., events_caught_up: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
