from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_FORM_FP16: _ClassVar[KvForm]
    KV_FORM_TURBOQUANT: _ClassVar[KvForm]
KV_FORM_FP16: KvForm
KV_FORM_TURBOQUANT: KvForm

class Namespace(_message.Message):
    __slots__ = ("model_fingerprint", "num_layers", "num_kv_heads", "head_dim", "block_size", "kv_dtype", "format_version")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    kv_dtype: str
    format_version: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., kv_dtype: _Optional[str] = ..., format_version: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class CodecSettings(_message.Message):
    __slots__ = ("key_bits", "value_bits", "norm_correction", "key_qjl", "seed", "profile")
    KEY_BITS_FIELD_NUMBER: _ClassVar[int]
    VALUE_BITS_FIELD_NUMBER: _ClassVar[int]
    NORM_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    KEY_QJL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    key_bits: int
    value_bits: int
    norm_correction: bool
    key_qjl: bool
    seed: int
    profile: bytes
    def __init__(self, key_bits: _Optional[int] = ..., value_bits: _Optional[int] = ..., norm_correction: _Optional[bool] = ..., key_qjl: _Optional[bool] = ..., seed: _Optional[int] = ..., profile: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "token_ids", "trailing_partial")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TRAILING_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    trailing_partial: bool
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., trailing_partial: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hit_blocks", "hit_tokens", "lookup_tokens", "partial_tokens")
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    hit_blocks: int
    hit_tokens: int
    lookup_tokens: int
    partial_tokens: int
    def __init__(self, hit_blocks: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., lookup_tokens: _Optional[int] = ..., partial_tokens: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("namespace", "token_ids", "first_block", "num_blocks", "form", "codec", "trailing_partial")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TRAILING_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_block: int
    num_blocks: int
    form: KvForm
    codec: CodecSettings
    trailing_partial: bool
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., form: _Optional[_Union[KvForm, str]] = ..., codec: _Optional[_Union[CodecSettings, _Mapping]] = ..., trailing_partial: _Optional[bool] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("block_index", "layer_start", "layer_count", "keys", "values", "key_codes", "key_scales", "value_codes", "value_scales")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_COUNT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEY_CODES_FIELD_NUMBER: _ClassVar[int]
    KEY_SCALES_FIELD_NUMBER: _ClassVar[int]
    VALUE_CODES_FIELD_NUMBER: _ClassVar[int]
    VALUE_SCALES_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    layer_start: int
    layer_count: int
    keys: Tensor
    values: Tensor
    key_codes: Tensor
    key_scales: Tensor
    value_codes: Tensor
    value_scales: Tensor
    def __init__(self, block_index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_count: _Optional[int] = ..., keys: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., key_codes: _Optional[_Union[Tensor, _Mapping]] = ..., key_scales: _Optional[_Union[Tensor, _Mapping]] = ..., value_codes: _Optional[_Union[Tensor, _Mapping]] = ..., value_scales: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("namespace", "token_ids", "first_block", "chunk", "trailing_partial", "num_blocks")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILING_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_block: int
    chunk: KvChunk
    trailing_partial: bool
    num_blocks: int
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., first_block: _Optional[int] = ..., chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., trailing_partial: _Optional[bool] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored_blocks",)
    STORED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    stored_blocks: int
    def __init__(self, stored_blocks: _Optional[int] = ...) -> None: ...

class LocateRequest(_message.Message):
    __slots__ = ("namespace", "token_ids", "first_block", "num_blocks", "lease_ms", "trailing_partial")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    TRAILING_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_block: int
    num_blocks: int
    lease_ms: int
    trailing_partial: bool
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., lease_ms: _Optional[int] = ..., trailing_partial: _Optional[bool] = ...) -> None: ...

class BlockLocation(_message.Message):
    __slots__ = ("block_index", "file_size", "raw_size", "stored_size", "compression", "chunk_lengths", "chunk_checksums")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    STORED_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    file_size: int
    raw_size: int
    stored_size: int
    compression: str
    chunk_lengths: _containers.RepeatedScalarFieldContainer[int]
    chunk_checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, block_index: _Optional[int] = ..., file_size: _Optional[int] = ..., raw_size: _Optional[int] = ..., stored_size: _Optional[int] = ..., compression: _Optional[str] = ..., chunk_lengths: _Optional[_Iterable[int]] = ..., chunk_checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class LocateResponse(_message.Message):
    __slots__ = ("blocks_dir", "store_id", "lease_ms", "payload_version", "blocks", "more_by_fetch")
    BLOCKS_DIR_FIELD_NUMBER: _ClassVar[int]
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MORE_BY_FETCH_FIELD_NUMBER: _ClassVar[int]
    blocks_dir: str
    store_id: str
    lease_ms: int
    payload_version: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockLocation]
    more_by_fetch: bool
    def __init__(self, blocks_dir: _Optional[str] = ..., store_id: _Optional[str] = ..., lease_ms: _Optional[int] = ..., payload_version: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockLocation, _Mapping]]] = ..., more_by_fetch: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NamespaceRow(_message.Message):
    __slots__ = ("digest", "model", "num_layers", "num_kv_heads", "head_dim", "block_size", "blocks", "bytes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    blocks: int
    bytes: int
    def __init__(self, digest: _Optional[str] = ..., model: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("blocks", "bytes_on_disk", "logical_bytes", "max_bytes", "lookups", "lookup_tokens", "hit_tokens", "evictions", "verification_failures", "quarantined", "compression", "namespaces", "block_size_histogram", "recent_request_hit_rates", "attention_backend", "payload_bytes", "index_bytes", "tiers", "namespaces_omitted", "index_rebuilds", "rebuild_recovered_blocks", "rebuild_lost_blocks", "last_rebuild_time_ns", "last_rebuild_reason", "healed_records")
    class BlockSizeHistogramEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_ON_DISK_FIELD_NUMBER: _ClassVar[int]
    LOGICAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FAILURES_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    RECENT_REQUEST_HIT_RATES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_OMITTED_FIELD_NUMBER: _ClassVar[int]
    INDEX_REBUILDS_FIELD_NUMBER: _ClassVar[int]
    REBUILD_RECOVERED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REBUILD_LOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAST_REBUILD_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_REBUILD_REASON_FIELD_NUMBER: _ClassVar[int]
    HEALED_RECORDS_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    bytes_on_disk: int
    logical_bytes: int
    max_bytes: int
    lookups: int
    lookup_tokens: int
    hit_tokens: int
    evictions: int
    verification_failures: int
    quarantined: int
    compression: str
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceRow]
    block_size_histogram: _containers.ScalarMap[int, int]
    recent_request_hit_rates: _containers.RepeatedScalarFieldContainer[float]
    attention_backend: str
    payload_bytes: int
    index_bytes: int
    tiers: TierStats
    namespaces_omitted: int
    index_rebuilds: int
    rebuild_recovered_blocks: int
    rebuild_lost_blocks: int
    last_rebuild_time_ns: int
    last_rebuild_reason: str
    healed_records: int
    def __init__(self, blocks: _Optional[int] = ..., bytes_on_disk: _Optional[int] = ..., logical_bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., lookups: _Optional[int] = ..., lookup_tokens: _Optional[int] = ..., hit_tokens: _Optional[int] = ..., evictions: _Optional[int] = ..., verification_failures: _Optional[int] = ..., quarantined: _Optional[int] = ..., compression: _Optional[str] = ..., namespaces: _Optional[_Iterable[_Union[NamespaceRow, _Mapping]]] = ..., block_size_histogram: _Optional[_Mapping[int, int]] = ..., recent_request_hit_rates: _Optional[_Iterable[float]] = ..., attention_backend: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., index_bytes: _Optional[int] = ..., tiers: _Optional[_Union[TierStats, _Mapping]] = ..., namespaces_omitted: _Optional[int] = ..., index_rebuilds: _Optional[int] = ..., rebuild_recovered_blocks: _Optional[int] = ..., rebuild_lost_blocks: _Optional[int] = ..., last_rebuild_time_ns: _Optional[int] = ..., last_rebuild_reason: _Optional[str] = ..., healed_records: _Optional[int] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("lookup_tokens", "local_hit_tokens", "remote_hit_tokens", "remote_address", "remote_state", "remote_last_error", "remote_hit_blocks", "remote_bytes_in", "remote_bytes_out", "remote_errors", "remote_lookup_timeouts", "remote_verification_failures", "remote_incomplete", "remote_uploaded_blocks", "remote_uploads_skipped", "remote_uploads_dropped", "remote_uploads_failed", "remote_upload_queue_bytes", "local_copies", "local_copies_failed", "remote_lookup_ms_p50", "remote_lookup_ms_p99", "remote_get_ms_p50", "remote_get_ms_p99", "remote_put_ms_p50", "remote_put_ms_p99", "local_copies_dropped", "remote_lookups_while_connecting")
    LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_STATE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    REMOTE_HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    REMOTE_BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_LOOKUP_TIMEOUTS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_VERIFICATION_FAILURES_FIELD_NUMBER: _ClassVar[int]
    REMOTE_INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_UPLOADED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_UPLOADS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    REMOTE_UPLOADS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    REMOTE_UPLOADS_FAILED_FIELD_NUMBER: _ClassVar[int]
    REMOTE_UPLOAD_QUEUE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_COPIES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_COPIES_FAILED_FIELD_NUMBER: _ClassVar[int]
    REMOTE_LOOKUP_MS_P50_FIELD_NUMBER: _ClassVar[int]
    REMOTE_LOOKUP_MS_P99_FIELD_NUMBER: _ClassVar[int]
    REMOTE_GET_MS_P50_FIELD_NUMBER: _ClassVar[int]
    REMOTE_GET_MS_P99_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PUT_MS_P50_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PUT_MS_P99_FIELD_NUMBER: _ClassVar[int]
    LOCAL_COPIES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    REMOTE_LOOKUPS_WHILE_CONNECTING_FIELD_NUMBER: _ClassVar[int]
    lookup_tokens: int
    local_hit_tokens: int
    remote_hit_tokens: int
    remote_address: str
    remote_state: str
    remote_last_error: str
    remote_hit_blocks: int
    remote_bytes_in: int
    remote_bytes_out: int
    remote_errors: int
    remote_lookup_timeouts: int
    remote_verification_failures: int
    remote_incomplete: int
    remote_uploaded_blocks: int
    remote_uploads_skipped: int
    remote_uploads_dropped: int
    remote_uploads_failed: int
    remote_upload_queue_bytes: int
    local_copies: int
    local_copies_failed: int
    remote_lookup_ms_p50: float
    remote_lookup_ms_p99: float
    remote_get_ms_p50: float
    remote_get_ms_p99: float
    remote_put_ms_p50: float
    remote_put_ms_p99: float
    local_copies_dropped: int
    remote_lookups_while_connecting: int
    def __init__(self, lookup_tokens: _Optional[int] = ..., local_hit_tokens: _Optional[int] = ..., remote_hit_tokens: _Optional[int] = ..., remote_address: _Optional[str] = ..., remote_state: _Optional[str] = ..., remote_last_error: _Optional[str] = ..., remote_hit_blocks: _Optional[int] = ..., remote_bytes_in: _Optional[int] = ..., remote_bytes_out: _Optional[int] = ..., remote_errors: _Optional[int] = ..., remote_lookup_timeouts: _Optional[int] = ..., remote_verification_failures: _Optional[int] = ..., remote_incomplete: _Optional[int] = ..., remote_uploaded_blocks: _Optional[int] = ..., remote_uploads_skipped: _Optional[int] = ..., remote_uploads_dropped: _Optional[int] = ..., remote_uploads_failed: _Optional[int] = ..., remote_upload_queue_bytes: _Optional[int] = ..., local_copies: _Optional[int] = ..., local_copies_failed: _Optional[int] = ..., remote_lookup_ms_p50: _Optional[float] = ..., remote_lookup_ms_p99: _Optional[float] = ..., remote_get_ms_p50: _Optional[float] = ..., remote_get_ms_p99: _Optional[float] = ..., remote_put_ms_p50: _Optional[float] = ..., remote_put_ms_p99: _Optional[float] = ..., local_copies_dropped: _Optional[int] = ..., remote_lookups_while_connecting: _Optional[int] = ...) -> None: ...
