from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_ROLE_UNSPECIFIED: _ClassVar[NodeRole]
    NODE_ROLE_TRAINER: _ClassVar[NodeRole]
    NODE_ROLE_EVALUATOR: _ClassVar[NodeRole]

class RoundPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_PHASE_UNSPECIFIED: _ClassVar[RoundPhase]
    ROUND_PHASE_WAITING_FOR_NODES: _ClassVar[RoundPhase]
    ROUND_PHASE_COLLECTING: _ClassVar[RoundPhase]
    ROUND_PHASE_FINISHED: _ClassVar[RoundPhase]
    ROUND_PHASE_FAILED: _ClassVar[RoundPhase]
NODE_ROLE_UNSPECIFIED: NodeRole
NODE_ROLE_TRAINER: NodeRole
NODE_ROLE_EVALUATOR: NodeRole
ROUND_PHASE_UNSPECIFIED: RoundPhase
ROUND_PHASE_WAITING_FOR_NODES: RoundPhase
ROUND_PHASE_COLLECTING: RoundPhase
ROUND_PHASE_FINISHED: RoundPhase
ROUND_PHASE_FAILED: RoundPhase

class RoundInfo(_message.Message):
    __slots__ = ("run_id", "round_id", "global_version", "total_rounds", "phase", "deadline_unix_ms", "update_accepted", "registered_trainers", "updates_received", "message", "best_version", "decided_version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_TRAINERS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECIDED_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round_id: int
    global_version: int
    total_rounds: int
    phase: RoundPhase
    deadline_unix_ms: int
    update_accepted: bool
    registered_trainers: int
    updates_received: int
    message: str
    best_version: int
    decided_version: int
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ..., global_version: _Optional[int] = ..., total_rounds: _Optional[int] = ..., phase: _Optional[_Union[RoundPhase, str]] = ..., deadline_unix_ms: _Optional[int] = ..., update_accepted: _Optional[bool] = ..., registered_trainers: _Optional[int] = ..., updates_received: _Optional[int] = ..., message: _Optional[str] = ..., best_version: _Optional[int] = ..., decided_version: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "role", "backbone_fingerprint", "class_names", "embed_dim", "method", "initial_state_sha256", "num_train_samples", "num_val_samples", "num_test_samples", "software_version", "dry_run", "session_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_VAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_TEST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: NodeRole
    backbone_fingerprint: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    embed_dim: int
    method: str
    initial_state_sha256: str
    num_train_samples: int
    num_val_samples: int
    num_test_samples: int
    software_version: str
    dry_run: bool
    session_id: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[NodeRole, str]] = ..., backbone_fingerprint: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., embed_dim: _Optional[int] = ..., method: _Optional[str] = ..., initial_state_sha256: _Optional[str] = ..., num_train_samples: _Optional[int] = ..., num_val_samples: _Optional[int] = ..., num_test_samples: _Optional[int] = ..., software_version: _Optional[str] = ..., dry_run: _Optional[bool] = ..., session_id: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("round", "codec", "delta", "drop_masked_rows", "heartbeat_interval_ms", "max_chunk_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DROP_MASKED_ROWS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    codec: str
    delta: bool
    drop_masked_rows: bool
    heartbeat_interval_ms: int
    max_chunk_bytes: int
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ..., codec: _Optional[str] = ..., delta: _Optional[bool] = ..., drop_masked_rows: _Optional[bool] = ..., heartbeat_interval_ms: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "session_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    session_id: str
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "wait_for_round", "max_wait_ms", "session_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    wait_for_round: int
    max_wait_ms: int
    session_id: str
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., wait_for_round: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class GetRoundResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ...) -> None: ...

class FetchGlobalRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    version: int
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PayloadHeader(_message.Message):
    __slots__ = ("run_id", "round_id", "node_id", "update_id", "version", "codec", "delta", "raw_bytes", "wire_bytes", "sha256", "num_train_samples", "train")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round_id: int
    node_id: str
    update_id: str
    version: int
    codec: str
    delta: bool
    raw_bytes: int
    wire_bytes: int
    sha256: str
    num_train_samples: int
    train: TrainSummary
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ..., node_id: _Optional[str] = ..., update_id: _Optional[str] = ..., version: _Optional[int] = ..., codec: _Optional[str] = ..., delta: _Optional[bool] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., num_train_samples: _Optional[int] = ..., train: _Optional[_Union[TrainSummary, _Mapping]] = ...) -> None: ...

class TrainSummary(_message.Message):
    __slots__ = ("steps", "seconds", "loss", "dp_epsilon", "dp_delta")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    steps: int
    seconds: float
    loss: float
    dp_epsilon: float
    dp_delta: float
    def __init__(self, steps: _Optional[int] = ..., seconds: _Optional[float] = ..., loss: _Optional[float] = ..., dp_epsilon: _Optional[float] = ..., dp_delta: _Optional[float] = ...) -> None: ...

class FetchGlobalResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PayloadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PayloadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PayloadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PayloadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("update_id", "round_id", "replayed", "updates_received", "receipt", "receipt_signature")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    round_id: int
    replayed: bool
    updates_received: int
    receipt: str
    receipt_signature: str
    def __init__(self, update_id: _Optional[str] = ..., round_id: _Optional[int] = ..., replayed: _Optional[bool] = ..., updates_received: _Optional[int] = ..., receipt: _Optional[str] = ..., receipt_signature: _Optional[str] = ...) -> None: ...

class EvalMetrics(_message.Message):
    __slots__ = ("num_samples", "accuracy", "balanced_accuracy", "macro_f1", "ece")
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BALANCED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    ECE_FIELD_NUMBER: _ClassVar[int]
    num_samples: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    ece: float
    def __init__(self, num_samples: _Optional[int] = ..., accuracy: _Optional[float] = ..., balanced_accuracy: _Optional[float] = ..., macro_f1: _Optional[float] = ..., ece: _Optional[float] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "version", "report_id", "val", "test", "head", "train")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    VAL_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    version: int
    report_id: str
    val: EvalMetrics
    test: EvalMetrics
    head: str
    train: TrainSummary
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., version: _Optional[int] = ..., report_id: _Optional[str] = ..., val: _Optional[_Union[EvalMetrics, _Mapping]] = ..., test: _Optional[_Union[EvalMetrics, _Mapping]] = ..., head: _Optional[str] = ..., train: _Optional[_Union[TrainSummary, _Mapping]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ("report_id", "replayed")
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    report_id: str
    replayed: bool
    def __init__(self, report_id: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...
