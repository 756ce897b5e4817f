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

class SecAggPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEC_AGG_PHASE_UNSPECIFIED: _ClassVar[SecAggPhase]
    SEC_AGG_PHASE_KEYS: _ClassVar[SecAggPhase]
    SEC_AGG_PHASE_SHARES: _ClassVar[SecAggPhase]
    SEC_AGG_PHASE_MASKED: _ClassVar[SecAggPhase]
    SEC_AGG_PHASE_UNMASK: _ClassVar[SecAggPhase]
    SEC_AGG_PHASE_CLOSED: _ClassVar[SecAggPhase]
NODE_ROLE_UNSPECIFIED: NodeRole
NODE_ROLE_TRAINER: NodeRole
NODE_ROLE_EVALUATOR: NodeRole
ROUND_PHASE_UNSPECIFIED: RoundPhase
ROUND_PHASE_WAITING_FOR_NODES: RoundPhase
ROUND_PHASE_COLLECTING: RoundPhase
ROUND_PHASE_FINISHED: RoundPhase
ROUND_PHASE_FAILED: RoundPhase
SEC_AGG_PHASE_UNSPECIFIED: SecAggPhase
SEC_AGG_PHASE_KEYS: SecAggPhase
SEC_AGG_PHASE_SHARES: SecAggPhase
SEC_AGG_PHASE_MASKED: SecAggPhase
SEC_AGG_PHASE_UNMASK: SecAggPhase
SEC_AGG_PHASE_CLOSED: SecAggPhase

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
    __slots__ = ("node_id", "role", "backbone_fingerprint", "class_names", "embed_dim", "method", "initial_state_sha256", "num_train_samples", "num_val_samples", "num_test_samples", "software_version", "dry_run", "session_id", "secure_aggregation")
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
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
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
    secure_aggregation: bool
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[_Union[NodeRole, str]] = ..., backbone_fingerprint: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ..., embed_dim: _Optional[int] = ..., method: _Optional[str] = ..., initial_state_sha256: _Optional[str] = ..., num_train_samples: _Optional[int] = ..., num_val_samples: _Optional[int] = ..., num_test_samples: _Optional[int] = ..., software_version: _Optional[str] = ..., dry_run: _Optional[bool] = ..., session_id: _Optional[str] = ..., secure_aggregation: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("round", "codec", "delta", "drop_masked_rows", "heartbeat_interval_ms", "max_chunk_bytes", "secure_aggregation")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DROP_MASKED_ROWS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    round: RoundInfo
    codec: str
    delta: bool
    drop_masked_rows: bool
    heartbeat_interval_ms: int
    max_chunk_bytes: int
    secure_aggregation: bool
    def __init__(self, round: _Optional[_Union[RoundInfo, _Mapping]] = ..., codec: _Optional[str] = ..., delta: _Optional[bool] = ..., drop_masked_rows: _Optional[bool] = ..., heartbeat_interval_ms: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., secure_aggregation: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("run_id", "round_id", "node_id", "update_id", "version", "codec", "delta", "raw_bytes", "wire_bytes", "sha256", "num_train_samples", "train", "secagg_session")
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
    SECAGG_SESSION_FIELD_NUMBER: _ClassVar[int]
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
    secagg_session: str
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ..., node_id: _Optional[str] = ..., update_id: _Optional[str] = ..., version: _Optional[int] = ..., codec: _Optional[str] = ..., delta: _Optional[bool] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., num_train_samples: _Optional[int] = ..., train: _Optional[_Union[TrainSummary, _Mapping]] = ..., secagg_session: _Optional[str] = ...) -> None: ...

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

class SecAggAdvertiseRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "round_id", "session", "c_public", "s_public", "certificate_pem", "signature")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    C_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    round_id: int
    session: str
    c_public: bytes
    s_public: bytes
    certificate_pem: bytes
    signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., round_id: _Optional[int] = ..., session: _Optional[str] = ..., c_public: _Optional[bytes] = ..., s_public: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggShareRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "round_id", "session", "ciphertexts", "b_commitment", "commitment_signature")
    class CiphertextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    B_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    COMMITMENT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    round_id: int
    session: str
    ciphertexts: _containers.ScalarMap[str, bytes]
    b_commitment: str
    commitment_signature: bytes
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., round_id: _Optional[int] = ..., session: _Optional[str] = ..., ciphertexts: _Optional[_Mapping[str, bytes]] = ..., b_commitment: _Optional[str] = ..., commitment_signature: _Optional[bytes] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("dealer", "kind", "x", "y", "signature")
    DEALER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    dealer: str
    kind: str
    x: int
    y: bytes
    signature: bytes
    def __init__(self, dealer: _Optional[str] = ..., kind: _Optional[str] = ..., x: _Optional[int] = ..., y: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "round_id", "session", "shares")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    round_id: int
    session: str
    shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., round_id: _Optional[int] = ..., session: _Optional[str] = ..., shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("session", "phase", "received")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    session: str
    phase: SecAggPhase
    received: int
    def __init__(self, session: _Optional[str] = ..., phase: _Optional[_Union[SecAggPhase, str]] = ..., received: _Optional[int] = ...) -> None: ...

class SecAggAdvertiseResponse(_message.Message):
    __slots__ = ("ack",)
    ACK_FIELD_NUMBER: _ClassVar[int]
    ack: SecAggAck
    def __init__(self, ack: _Optional[_Union[SecAggAck, _Mapping]] = ...) -> None: ...

class SecAggShareResponse(_message.Message):
    __slots__ = ("ack",)
    ACK_FIELD_NUMBER: _ClassVar[int]
    ack: SecAggAck
    def __init__(self, ack: _Optional[_Union[SecAggAck, _Mapping]] = ...) -> None: ...

class SecAggUnmaskResponse(_message.Message):
    __slots__ = ("ack",)
    ACK_FIELD_NUMBER: _ClassVar[int]
    ack: SecAggAck
    def __init__(self, ack: _Optional[_Union[SecAggAck, _Mapping]] = ...) -> None: ...

class SecAggPollRequest(_message.Message):
    __slots__ = ("run_id", "node_id", "session", "wait_for_phase", "max_wait_ms", "session_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_PHASE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    node_id: str
    session: str
    wait_for_phase: SecAggPhase
    max_wait_ms: int
    session_id: str
    def __init__(self, run_id: _Optional[str] = ..., node_id: _Optional[str] = ..., session: _Optional[str] = ..., wait_for_phase: _Optional[_Union[SecAggPhase, str]] = ..., max_wait_ms: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class SecAggPollResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: SecAggState
    def __init__(self, state: _Optional[_Union[SecAggState, _Mapping]] = ...) -> None: ...

class SecAggMember(_message.Message):
    __slots__ = ("node_id", "c_public", "s_public", "certificate_pem", "signature", "weight")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    C_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    S_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    c_public: bytes
    s_public: bytes
    certificate_pem: bytes
    signature: bytes
    weight: float
    def __init__(self, node_id: _Optional[str] = ..., c_public: _Optional[bytes] = ..., s_public: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., weight: _Optional[float] = ...) -> None: ...

class SecAggState(_message.Message):
    __slots__ = ("run_id", "round_id", "session", "phase", "deadline_unix_ms", "roster", "threshold", "clip", "max_update_norm", "max_abs_value", "members", "inbox", "survivors", "message", "excluded")
    class InboxEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_VALUE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    INBOX_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round_id: int
    session: str
    phase: SecAggPhase
    deadline_unix_ms: int
    roster: _containers.RepeatedCompositeFieldContainer[SecAggMember]
    threshold: int
    clip: float
    max_update_norm: float
    max_abs_value: float
    members: _containers.RepeatedScalarFieldContainer[str]
    inbox: _containers.ScalarMap[str, bytes]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    message: str
    excluded: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., round_id: _Optional[int] = ..., session: _Optional[str] = ..., phase: _Optional[_Union[SecAggPhase, str]] = ..., deadline_unix_ms: _Optional[int] = ..., roster: _Optional[_Iterable[_Union[SecAggMember, _Mapping]]] = ..., threshold: _Optional[int] = ..., clip: _Optional[float] = ..., max_update_norm: _Optional[float] = ..., max_abs_value: _Optional[float] = ..., members: _Optional[_Iterable[str]] = ..., inbox: _Optional[_Mapping[str, bytes]] = ..., survivors: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ..., excluded: _Optional[_Iterable[str]] = ...) -> None: ...
