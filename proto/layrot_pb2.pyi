from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobMessage(_message.Message):
    __slots__ = ("hello", "steps", "control_ack", "goodbye")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ACK_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    steps: StepBatch
    control_ack: ControlAck
    goodbye: Goodbye
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., steps: _Optional[_Union[StepBatch, _Mapping]] = ..., control_ack: _Optional[_Union[ControlAck, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ...) -> None: ...

class CollectorMessage(_message.Message):
    __slots__ = ("ack", "rate_command", "error", "welcome")
    ACK_FIELD_NUMBER: _ClassVar[int]
    RATE_COMMAND_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    rate_command: RateCommand
    error: SessionError
    welcome: Welcome
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., rate_command: _Optional[_Union[RateCommand, _Mapping]] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "index", "shape", "init_norm", "numel", "module_type", "sharded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INIT_NORM_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    MODULE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHARDED_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    init_norm: float
    numel: int
    module_type: str
    sharded: bool
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., init_norm: _Optional[float] = ..., numel: _Optional[int] = ..., module_type: _Optional[str] = ..., sharded: bool = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("layca", "control", "loss")
    LAYCA_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    layca: bool
    control: bool
    loss: bool
    def __init__(self, layca: bool = ..., control: bool = ..., loss: bool = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("run", "rank", "world_size", "framework", "framework_version", "host", "pid", "layers", "capabilities", "client_version", "every", "meta", "applied_command_version", "session_id", "run_key", "replay", "total_steps")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    FRAMEWORK_FIELD_NUMBER: _ClassVar[int]
    FRAMEWORK_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    APPLIED_COMMAND_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_KEY_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    run: str
    rank: int
    world_size: int
    framework: str
    framework_version: str
    host: str
    pid: int
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    capabilities: Capabilities
    client_version: str
    every: int
    meta: _containers.ScalarMap[str, str]
    applied_command_version: int
    session_id: str
    run_key: str
    replay: bool
    total_steps: int
    def __init__(self, run: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., framework: _Optional[str] = ..., framework_version: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., client_version: _Optional[str] = ..., every: _Optional[int] = ..., meta: _Optional[_Mapping[str, str]] = ..., applied_command_version: _Optional[int] = ..., session_id: _Optional[str] = ..., run_key: _Optional[str] = ..., replay: bool = ..., total_steps: _Optional[int] = ...) -> None: ...

class StepBatch(_message.Message):
    __slots__ = ("seq", "steps", "times", "num_layers", "norm", "dist0", "dstep", "norm_prev", "rho", "loss", "command_version", "dot0", "dotstep")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    DIST0_FIELD_NUMBER: _ClassVar[int]
    DSTEP_FIELD_NUMBER: _ClassVar[int]
    NORM_PREV_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOT0_FIELD_NUMBER: _ClassVar[int]
    DOTSTEP_FIELD_NUMBER: _ClassVar[int]
    seq: int
    steps: _containers.RepeatedScalarFieldContainer[int]
    times: _containers.RepeatedScalarFieldContainer[float]
    num_layers: int
    norm: bytes
    dist0: bytes
    dstep: bytes
    norm_prev: bytes
    rho: bytes
    loss: _containers.RepeatedScalarFieldContainer[float]
    command_version: _containers.RepeatedScalarFieldContainer[int]
    dot0: bytes
    dotstep: bytes
    def __init__(self, seq: _Optional[int] = ..., steps: _Optional[_Iterable[int]] = ..., times: _Optional[_Iterable[float]] = ..., num_layers: _Optional[int] = ..., norm: _Optional[bytes] = ..., dist0: _Optional[bytes] = ..., dstep: _Optional[bytes] = ..., norm_prev: _Optional[bytes] = ..., rho: _Optional[bytes] = ..., loss: _Optional[_Iterable[float]] = ..., command_version: _Optional[_Iterable[int]] = ..., dot0: _Optional[bytes] = ..., dotstep: _Optional[bytes] = ...) -> None: ...

class ControlAck(_message.Message):
    __slots__ = ("version", "applied", "reason", "step")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    version: int
    applied: bool
    reason: str
    step: int
    def __init__(self, version: _Optional[int] = ..., applied: bool = ..., reason: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("last_seq", "reason")
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    reason: str
    def __init__(self, last_seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "stored", "failed")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    stored: _containers.RepeatedScalarFieldContainer[int]
    failed: _containers.RepeatedCompositeFieldContainer[Nack]
    def __init__(self, seq: _Optional[int] = ..., stored: _Optional[_Iterable[int]] = ..., failed: _Optional[_Iterable[_Union[Nack, _Mapping]]] = ...) -> None: ...

class Nack(_message.Message):
    __slots__ = ("seq", "code", "message", "retry", "retry_after_s")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    seq: int
    code: str
    message: str
    retry: bool
    retry_after_s: float
    def __init__(self, seq: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., retry: bool = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("collector_version", "stored_step")
    COLLECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    STORED_STEP_FIELD_NUMBER: _ClassVar[int]
    collector_version: str
    stored_step: int
    def __init__(self, collector_version: _Optional[str] = ..., stored_step: _Optional[int] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("code", "message", "seq")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    seq: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class RhoSchedule(_message.Message):
    __slots__ = ("rho0", "kind", "milestones", "factor", "total_steps", "rho_min")
    RHO0_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MILESTONES_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    RHO_MIN_FIELD_NUMBER: _ClassVar[int]
    rho0: float
    kind: str
    milestones: _containers.RepeatedScalarFieldContainer[float]
    factor: float
    total_steps: int
    rho_min: float
    def __init__(self, rho0: _Optional[float] = ..., kind: _Optional[str] = ..., milestones: _Optional[_Iterable[float]] = ..., factor: _Optional[float] = ..., total_steps: _Optional[int] = ..., rho_min: _Optional[float] = ...) -> None: ...

class RateTable(_message.Message):
    __slots__ = ("start_step", "num_layers", "rates")
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    RATES_FIELD_NUMBER: _ClassVar[int]
    start_step: int
    num_layers: int
    rates: bytes
    def __init__(self, start_step: _Optional[int] = ..., num_layers: _Optional[int] = ..., rates: _Optional[bytes] = ...) -> None: ...

class RateCommand(_message.Message):
    __slots__ = ("version", "run", "mode", "alpha", "schedule", "multipliers", "layer_multipliers", "table", "reason", "issued_by", "issued_at", "controller", "step_offset", "apply_at_step")
    class LayerMultipliersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_MULTIPLIERS_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BY_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    STEP_OFFSET_FIELD_NUMBER: _ClassVar[int]
    APPLY_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    version: int
    run: str
    mode: str
    alpha: float
    schedule: RhoSchedule
    multipliers: _containers.RepeatedScalarFieldContainer[float]
    layer_multipliers: _containers.ScalarMap[str, float]
    table: RateTable
    reason: str
    issued_by: str
    issued_at: float
    controller: str
    step_offset: int
    apply_at_step: int
    def __init__(self, version: _Optional[int] = ..., run: _Optional[str] = ..., mode: _Optional[str] = ..., alpha: _Optional[float] = ..., schedule: _Optional[_Union[RhoSchedule, _Mapping]] = ..., multipliers: _Optional[_Iterable[float]] = ..., layer_multipliers: _Optional[_Mapping[str, float]] = ..., table: _Optional[_Union[RateTable, _Mapping]] = ..., reason: _Optional[str] = ..., issued_by: _Optional[str] = ..., issued_at: _Optional[float] = ..., controller: _Optional[str] = ..., step_offset: _Optional[int] = ..., apply_at_step: _Optional[int] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class DeleteRunResponse(_message.Message):
    __slots__ = ("run", "steps")
    RUN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    run: str
    steps: int
    def __init__(self, run: _Optional[str] = ..., steps: _Optional[int] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("steps", "runs", "orphan_samples", "bytes_before", "bytes_after")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    ORPHAN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    steps: int
    runs: int
    orphan_samples: int
    bytes_before: int
    bytes_after: int
    def __init__(self, steps: _Optional[int] = ..., runs: _Optional[int] = ..., orphan_samples: _Optional[int] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run", "framework", "host", "world_size", "step", "last_report", "num_layers", "min_rotation", "mean_rotation", "connected", "sessions", "layca", "control", "first_report", "meta", "layers_at_target_ratio", "rotation_target", "indicator_judged", "layers_under_rotated", "total_steps", "loss")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_FIELD_NUMBER: _ClassVar[int]
    FRAMEWORK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MIN_ROTATION_FIELD_NUMBER: _ClassVar[int]
    MEAN_ROTATION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    LAYCA_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    FIRST_REPORT_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    LAYERS_AT_TARGET_RATIO_FIELD_NUMBER: _ClassVar[int]
    ROTATION_TARGET_FIELD_NUMBER: _ClassVar[int]
    INDICATOR_JUDGED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_UNDER_ROTATED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    run: str
    framework: str
    host: str
    world_size: int
    step: int
    last_report: float
    num_layers: int
    min_rotation: float
    mean_rotation: float
    connected: bool
    sessions: int
    layca: bool
    control: bool
    first_report: float
    meta: _containers.ScalarMap[str, str]
    layers_at_target_ratio: float
    rotation_target: float
    indicator_judged: bool
    layers_under_rotated: int
    total_steps: int
    loss: float
    def __init__(self, run: _Optional[str] = ..., framework: _Optional[str] = ..., host: _Optional[str] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ..., last_report: _Optional[float] = ..., num_layers: _Optional[int] = ..., min_rotation: _Optional[float] = ..., mean_rotation: _Optional[float] = ..., connected: bool = ..., sessions: _Optional[int] = ..., layca: bool = ..., control: bool = ..., first_report: _Optional[float] = ..., meta: _Optional[_Mapping[str, str]] = ..., layers_at_target_ratio: _Optional[float] = ..., rotation_target: _Optional[float] = ..., indicator_judged: bool = ..., layers_under_rotated: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class LayerState(_message.Message):
    __slots__ = ("name", "index", "shape", "init_norm", "rotation", "step_angle", "weight_norm", "rho", "step", "under_rotated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    INIT_NORM_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    STEP_ANGLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NORM_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    UNDER_ROTATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    init_norm: float
    rotation: float
    step_angle: float
    weight_norm: float
    rho: float
    step: int
    under_rotated: bool
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., init_norm: _Optional[float] = ..., rotation: _Optional[float] = ..., step_angle: _Optional[float] = ..., weight_norm: _Optional[float] = ..., rho: _Optional[float] = ..., step: _Optional[int] = ..., under_rotated: bool = ...) -> None: ...

class RunDetail(_message.Message):
    __slots__ = ("summary", "layers")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    summary: RunSummary
    layers: _containers.RepeatedCompositeFieldContainer[LayerState]
    def __init__(self, summary: _Optional[_Union[RunSummary, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerState, _Mapping]]] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("run", "since_step", "until_step", "rank")
    RUN_FIELD_NUMBER: _ClassVar[int]
    SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    UNTIL_STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    run: str
    since_step: int
    until_step: int
    rank: int
    def __init__(self, run: _Optional[str] = ..., since_step: _Optional[int] = ..., until_step: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class HistoryChunk(_message.Message):
    __slots__ = ("layer_names", "steps", "times", "num_layers", "rotation", "step_angle", "weight_norm", "rho", "loss")
    LAYER_NAMES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMES_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    STEP_ANGLE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_NORM_FIELD_NUMBER: _ClassVar[int]
    RHO_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    layer_names: _containers.RepeatedScalarFieldContainer[str]
    steps: _containers.RepeatedScalarFieldContainer[int]
    times: _containers.RepeatedScalarFieldContainer[float]
    num_layers: int
    rotation: bytes
    step_angle: bytes
    weight_norm: bytes
    rho: bytes
    loss: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer_names: _Optional[_Iterable[str]] = ..., steps: _Optional[_Iterable[int]] = ..., times: _Optional[_Iterable[float]] = ..., num_layers: _Optional[int] = ..., rotation: _Optional[bytes] = ..., step_angle: _Optional[bytes] = ..., weight_norm: _Optional[bytes] = ..., rho: _Optional[bytes] = ..., loss: _Optional[_Iterable[float]] = ...) -> None: ...

class SetControlRequest(_message.Message):
    __slots__ = ("run", "command")
    RUN_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    run: str
    command: RateCommand
    def __init__(self, run: _Optional[str] = ..., command: _Optional[_Union[RateCommand, _Mapping]] = ...) -> None: ...

class GetControlRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("version", "time", "who", "what", "event", "step", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: int
    time: float
    who: str
    what: str
    event: str
    step: int
    reason: str
    def __init__(self, version: _Optional[int] = ..., time: _Optional[float] = ..., who: _Optional[str] = ..., what: _Optional[str] = ..., event: _Optional[str] = ..., step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ControlStatus(_message.Message):
    __slots__ = ("run", "requested", "applied_version", "applied_step", "rejected_reason", "audit", "layer_names", "requested_rho", "applied_rho", "ranks")
    RUN_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    LAYER_NAMES_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_RHO_FIELD_NUMBER: _ClassVar[int]
    APPLIED_RHO_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    run: str
    requested: RateCommand
    applied_version: int
    applied_step: int
    rejected_reason: str
    audit: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    layer_names: _containers.RepeatedScalarFieldContainer[str]
    requested_rho: _containers.RepeatedScalarFieldContainer[float]
    applied_rho: _containers.RepeatedScalarFieldContainer[float]
    ranks: _containers.RepeatedCompositeFieldContainer[RankControl]
    def __init__(self, run: _Optional[str] = ..., requested: _Optional[_Union[RateCommand, _Mapping]] = ..., applied_version: _Optional[int] = ..., applied_step: _Optional[int] = ..., rejected_reason: _Optional[str] = ..., audit: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., layer_names: _Optional[_Iterable[str]] = ..., requested_rho: _Optional[_Iterable[float]] = ..., applied_rho: _Optional[_Iterable[float]] = ..., ranks: _Optional[_Iterable[_Union[RankControl, _Mapping]]] = ...) -> None: ...

class RankControl(_message.Message):
    __slots__ = ("rank", "applied_version", "applied_step", "wanted_step", "late", "rejected_version", "rejected_reason", "step", "connected")
    RANK_FIELD_NUMBER: _ClassVar[int]
    APPLIED_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEP_FIELD_NUMBER: _ClassVar[int]
    WANTED_STEP_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    applied_version: int
    applied_step: int
    wanted_step: int
    late: bool
    rejected_version: int
    rejected_reason: str
    step: int
    connected: bool
    def __init__(self, rank: _Optional[int] = ..., applied_version: _Optional[int] = ..., applied_step: _Optional[int] = ..., wanted_step: _Optional[int] = ..., late: bool = ..., rejected_version: _Optional[int] = ..., rejected_reason: _Optional[str] = ..., step: _Optional[int] = ..., connected: bool = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("run", "layer", "step", "kind", "severity", "angle", "baseline", "time", "message", "loss_before", "loss_after", "incident", "layers", "updates", "updated", "last_step", "resolved")
    RUN_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    ANGLE_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    run: str
    layer: str
    step: int
    kind: str
    severity: str
    angle: float
    baseline: float
    time: float
    message: str
    loss_before: float
    loss_after: float
    incident: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    updates: int
    updated: float
    last_step: int
    resolved: float
    def __init__(self, run: _Optional[str] = ..., layer: _Optional[str] = ..., step: _Optional[int] = ..., kind: _Optional[str] = ..., severity: _Optional[str] = ..., angle: _Optional[float] = ..., baseline: _Optional[float] = ..., time: _Optional[float] = ..., message: _Optional[str] = ..., loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., incident: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., updates: _Optional[int] = ..., updated: _Optional[float] = ..., last_step: _Optional[int] = ..., resolved: _Optional[float] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("run", "limit", "since")
    RUN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    run: str
    limit: int
    since: float
    def __init__(self, run: _Optional[str] = ..., limit: _Optional[int] = ..., since: _Optional[float] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class Thresholds(_message.Message):
    __slots__ = ("abs_angle", "k", "window", "warmup", "stall_seconds", "min_angle", "ratio", "group", "single_ratio", "refractory", "not_learning_steps", "not_learning_drop", "not_learning_share")
    ABS_ANGLE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FIELD_NUMBER: _ClassVar[int]
    STALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_ANGLE_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    SINGLE_RATIO_FIELD_NUMBER: _ClassVar[int]
    REFRACTORY_FIELD_NUMBER: _ClassVar[int]
    NOT_LEARNING_STEPS_FIELD_NUMBER: _ClassVar[int]
    NOT_LEARNING_DROP_FIELD_NUMBER: _ClassVar[int]
    NOT_LEARNING_SHARE_FIELD_NUMBER: _ClassVar[int]
    abs_angle: float
    k: float
    window: int
    warmup: int
    stall_seconds: float
    min_angle: float
    ratio: float
    group: float
    single_ratio: float
    refractory: int
    not_learning_steps: float
    not_learning_drop: float
    not_learning_share: float
    def __init__(self, abs_angle: _Optional[float] = ..., k: _Optional[float] = ..., window: _Optional[int] = ..., warmup: _Optional[int] = ..., stall_seconds: _Optional[float] = ..., min_angle: _Optional[float] = ..., ratio: _Optional[float] = ..., group: _Optional[float] = ..., single_ratio: _Optional[float] = ..., refractory: _Optional[int] = ..., not_learning_steps: _Optional[float] = ..., not_learning_drop: _Optional[float] = ..., not_learning_share: _Optional[float] = ...) -> None: ...

class SetThresholdsRequest(_message.Message):
    __slots__ = ("run", "thresholds")
    RUN_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    run: str
    thresholds: Thresholds
    def __init__(self, run: _Optional[str] = ..., thresholds: _Optional[_Union[Thresholds, _Mapping]] = ...) -> None: ...
