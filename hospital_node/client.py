"""The hospital node: prepare local features, register, then follow the aggregator's rounds.

A trainer, each round ``r`` (which trains from global version ``r``):

1. catch up: fetch every published global it lacks and decode each against the one before;
2. evaluate: with global ``r`` loaded, validate (and test) its ensemble, report it as version ``r``;
3. train: :func:`shared.learning.rounds.make_update` (load global, one local round, encode), save the
   private state with the encoded update, then upload it (a retry re-sends the same bytes with the
   same update id);
4. wait (long-poll GetRound) for round ``r + 1``.

An evaluator (held-out hospital) does 1 and 2 only, with the global FAM and the prompts alone.
Every RPC has a deadline; transient failures are retried with exponential backoff and full jitter
(bounded: ``give_up_after_s``). A global the node cannot take (a stream without its header, more or
fewer bytes than announced, another version, codec or delta mode than the federation's, a payload
that fails the codec's validation) is a :class:`GlobalRefused` naming the
:class:`~shared.wire.reasons.Reason` it would earn on the aggregator: the node keeps the global it
holds, and its saved state, and fetches again after a backoff (:meth:`NodeClient._fetch_global`); a
stalled download ends at ``transfer_timeout_s`` and is retried the same way. Only after
``give_up_after_s`` of refused globals does the node stop (exit code 1). Every string the aggregator
sends that reaches a log line is escaped (:func:`shared.ops.logs.printable`).

A refusal is handled by the :class:`~shared.wire.reasons.Reason` the aggregator gives
(:meth:`NodeClient._call`): an unknown node registers again, an update the round no longer wants
(stale, future, already in) is dropped and the node follows the current round, and a refusal for good
(registration mismatch, identity, a payload refused) stops the node with the aggregator's message
(:class:`NodeRefused`, exit code 3; 4 when the aggregator runs another run).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

import grpc
import torch

from hospital_node.config import NodeConfig
from hospital_node.data import LocalData, load_local
from hospital_node.secure import Answered, SecureLink, SecureUploader, adapter_encoder
from hospital_node.state import NodeState, PendingUpdate, Snapshot, StateStore
from shared import __version__
from shared.audit import PublicKey, keep_receipt
from shared.backbone import DEFAULT_TEMPLATES, Backbone, BackboneSpec, load_backbone
from shared.codec import CODECS, CodecError
from shared.data.features import EncodeProgress, encode_samples
from shared.errors import FedMedCLIPError
from shared.learning.privacy import PrivacyBudgetSpent
from shared.learning.rounds import WireConfig, check_wire, decode_adapter, make_update
from shared.learning.training import HospitalLearner, TrainConfig, build_adapter, get_method
from shared.ops.config import ConfigError
from shared.ops.exitcodes import ExitCode
from shared.ops.logs import printable
from shared.ops.report import dumps_strict
from shared.ops.telemetry import CountingClientInterceptor, Telemetry
from shared.secagg import SecAggError
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2 as pb
from shared.wire.proto.fedmedclip.v1 import aggregator_service_pb2_grpc as pb_grpc
from shared.wire.protocol import metrics_to_proto, state_digest
from shared.wire.reasons import Action, Reason, reason_of
from shared.wire.tls import TlsMaterial, secure_channel
from shared.wire.transport import (
    MAX_PAYLOAD_BYTES,
    Backoff,
    PayloadAssemblyError,
    RetriesExhausted,
    assemble,
    call_with_retry,
    channel_options,
    chunk_size,
    chunks,
    sha256_hex,
)

log = logging.getLogger("fedmedclip.node")
T = TypeVar("T")
EVALUATIONS = "evaluations.jsonl"  # in state_dir: every evaluation in full, whatever share_metrics sends
SELECTION_WAIT_S = 30.0  # after the last round, wait at most this long for every trainer's final evaluation


class NodeStopped(Exception):
    """SIGTERM/SIGINT arrived: the loop unwinds, the state on disk is already consistent."""


class NodeRefused(FedMedCLIPError):
    """The aggregator refused this node for good; ``reason`` says why, the message is the aggregator's."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.code.name} ({reason}): {printable(message, 1000)}")
        self.reason = reason


class GlobalRefused(FedMedCLIPError):
    """A global from the aggregator that this node will not take; ``reason`` says why (as the aggregator would)."""

    def __init__(self, version: int, reason: Reason, message: str) -> None:
        super().__init__(f"global v{version} refused ({reason}): {printable(message, 500)}")
        self.version, self.reason = version, reason


@dataclass
class Setup:
    """What a node declares when it registers, known in seconds, before any image is encoded."""

    backbone: Backbone
    data: LocalData
    class_names: tuple[str, ...]
    fingerprint: str
    text: torch.Tensor  # the class prompts' features
    dim: int


@dataclass
class Prepared(Setup):
    """:class:`Setup` and the images' features (cached)."""

    features: torch.Tensor = None  # type: ignore[assignment]
    labels: torch.Tensor = None  # type: ignore[assignment]


def train_config(cfg: NodeConfig) -> TrainConfig:
    return replace(
        TrainConfig(),
        lr_adapter=cfg.lr_fam,
        lr_mlp=cfg.lr_mlp,
        batch_size=cfg.batch_size,
        local_epochs=cfg.local_epochs,
        compile=cfg.compile,
    )


def backbone_spec(cfg: NodeConfig) -> BackboneSpec:
    return BackboneSpec(
        kind=cfg.backbone,
        arch=cfg.arch,
        pretrained=cfg.pretrained,
        templates=tuple(cfg.templates) if cfg.templates else DEFAULT_TEMPLATES,
        runtime=cfg.runtime,
    )


def load_setup(cfg: NodeConfig, data: LocalData | None = None) -> Setup:
    """Local data (listed, not read; ``data`` if the preflight listed it already), backbone, prompt features
    and fingerprint: seconds."""
    if not cfg.data:
        raise ConfigError("no data: set data (a manifest CSV or an ImageFolder)")
    if data is None:
        data = load_local(cfg.data, cfg.classes, split_seed=cfg.split_seed, evaluator=cfg.role == "evaluator")
    backbone = load_backbone(backbone_spec(cfg), cfg.device)
    names = data.dataset.class_names
    text = backbone.text_features(names)
    return Setup(backbone, data, names, backbone.fingerprint(names), text, int(text.shape[1]))


def initial_adapter(cfg: NodeConfig, dim: int) -> dict[str, torch.Tensor]:
    """The federation's seeded global version 0, as every node and the aggregator build it."""
    return build_adapter(get_method(cfg.method), dim, train_config(cfg), cfg.seed).travel_state()


def registration(cfg: NodeConfig, setup: Setup, *, session_id: str = "", dry_run: bool = False) -> pb.RegisterRequest:
    """The node's Register request: everything the aggregator checks before it admits the node."""
    evaluator = cfg.role == "evaluator"
    n_train, n_val, n_test = setup.data.counts()
    return pb.RegisterRequest(
        node_id=cfg.node_id,
        role=pb.NODE_ROLE_EVALUATOR if evaluator else pb.NODE_ROLE_TRAINER,
        backbone_fingerprint=setup.fingerprint,
        class_names=list(setup.class_names),
        embed_dim=setup.dim,
        method=cfg.method,
        initial_state_sha256=state_digest(initial_adapter(cfg, setup.dim)),
        num_train_samples=0 if evaluator else n_train,
        num_val_samples=n_val,
        num_test_samples=n_test,
        software_version=__version__,
        dry_run=dry_run,
        session_id=session_id,
        secure_aggregation=cfg.secure_aggregation,
    )


def describe_round(info: pb.RoundInfo) -> str:
    """Where a run stands, in words: "waiting for nodes", "round 3 of 30", "finished after 30 rounds"."""
    if info.phase == pb.ROUND_PHASE_COLLECTING:
        return f"round {info.round_id + 1} of {info.total_rounds}"
    if info.phase == pb.ROUND_PHASE_FINISHED:
        return f"finished after {info.global_version} rounds"
    if info.phase == pb.ROUND_PHASE_FAILED:
        return f"failed after {info.global_version} rounds"
    return f"waiting for nodes ({info.total_rounds} rounds)"


def encode_progress_metrics(telemetry: Telemetry) -> Callable[[EncodeProgress], None]:
    """The callback that keeps ``fedmedclip_encode_images_total`` and ``fedmedclip_encode_pending_images``
    current while the node encodes (``make demo`` shows them as progress)."""
    counted = {"encoded": 0, "cache": 0}

    def update(p: EncodeProgress) -> None:
        for source, n in (("encoded", p.n_encoded), ("cache", p.n_cached)):
            telemetry.encode_images.labels(source=source).inc(n - counted[source])
            counted[source] = n
        telemetry.encode_pending.set(p.n_pending)

    return update


def prepare(cfg: NodeConfig, telemetry: Telemetry | None = None, setup: Setup | None = None) -> Prepared:
    """:func:`load_setup` (unless given), then the images' cached features (progress bar, and metrics)."""
    setup = setup or load_setup(cfg)
    data = setup.data
    features, stats = encode_samples(
        setup.backbone,
        data.dataset.samples,
        cfg.cache_dir,
        progress=cfg.progress,
        on_progress=encode_progress_metrics(telemetry) if telemetry is not None else None,
    )
    if telemetry is not None and stats.n_encoded:
        telemetry.encode_seconds.observe(stats.seconds)
    log.info(
        "%s: %d images (train %d / val %d / test %d), %d encoded in %.1fs, %d from cache",
        cfg.node_id,
        len(data.dataset),
        *data.counts(),
        stats.n_encoded,
        stats.seconds,
        stats.n_cached,
    )
    return Prepared(
        **{f.name: getattr(setup, f.name) for f in fields(Setup)},
        features=features,
        labels=torch.from_numpy(data.dataset.labels()),
    )


def build_learner(cfg: NodeConfig, prep: Prepared) -> HospitalLearner:
    """Exactly as the simulation builds hospital ``hospital_index``'s learner."""
    return HospitalLearner(
        get_method(cfg.method),
        train_config(cfg),
        dim=prep.dim,
        num_classes=len(prep.class_names),
        text_features=prep.text,
        logit_scale=prep.backbone.logit_scale,
        seed=cfg.seed,
        hospital_index=cfg.hospital_index,
        device=cfg.device,
        dp=cfg.dp_config(),  # its noise is seeded from the OS: nobody else can know (and subtract) it
    )


class NodeStatus:
    """What the node is doing, for ``/healthz`` (thread-safe; the loop updates it)."""

    def __init__(self, node_id: str) -> None:
        self._lock = threading.Lock()
        self._fields: dict[str, object] = {"node": node_id, "phase": "starting", "run_id": "", "global_version": 0}

    def set(self, **values: object) -> None:
        with self._lock:
            self._fields.update(values)

    def health(self) -> dict[str, object]:
        with self._lock:
            return {"status": "ok" if self._fields["phase"] != "stopped" else "stopping", **self._fields}


class NodeClient:
    """One node process: it follows the aggregator's runs one after the other (``once``: a single run)."""

    def __init__(
        self,
        cfg: NodeConfig,
        prep: Prepared,
        telemetry: Telemetry,
        stop: threading.Event,
        tls: TlsMaterial | None,
        status: NodeStatus | None = None,
    ) -> None:
        self.cfg, self.prep, self.t, self.stop, self.tls = cfg, prep, telemetry, stop, tls
        self.status = status or NodeStatus(cfg.node_id)
        self.method = get_method(cfg.method)
        self.learner = build_learner(cfg, prep)
        self.initial = initial_adapter(cfg, prep.dim)
        self.store = StateStore(cfg.state_dir)
        self.audit_key = PublicKey.from_file(cfg.audit_pub) if cfg.audit_pub else None  # checks receipts
        self.evaluator = cfg.role == "evaluator"
        self.backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s, give_up_after_s=cfg.give_up_after_s)
        self.rng = random.Random()
        self.channel = secure_channel(cfg.aggregator, tls, channel_options(), cfg.tls_server_name)
        counted = grpc.intercept_channel(self.channel, CountingClientInterceptor(telemetry.traffic))
        self.stub = pb_grpc.AggregatorServiceStub(counted)
        self.session_id = uuid.uuid4().hex  # this process; a second process registering takes the node id over
        self.refused: NodeRefused | None = None  # set by the heartbeat thread when this session is over
        self.run_id = ""
        self.run_over = False  # the run finished, failed or was replaced: the next one may start afresh
        self.wire = WireConfig()
        self.state: NodeState | None = None
        self.secagg_answered = Answered(None, "")  # secure aggregation: set for each run (_follow_run)
        self.privacy_stopped: str | None = None  # differential privacy: why this node trains no further in this run
        self.heartbeat_interval = 5.0
        self.chunk_bytes = chunk_size(0)
        split = prep.data.split
        idx = {name: torch.tensor(getattr(split, name), dtype=torch.long) for name in ("train", "val", "test")}
        self.parts = {name: (prep.features[i], prep.labels[i]) for name, i in idx.items()}

    # -- calls -------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], reregister: bool = True) -> T:
        """Call ``fn``: transient errors are retried with backoff, refusals handled by their Reason; honours stop.

        REREGISTER: register again (once), then call again. GIVE_UP: :class:`NodeRefused`. RESYNC (the
        round moved on) and failures without a reason propagate as the ``grpc.RpcError``.
        """
        reregistered = not reregister
        while True:
            if self.stop.is_set():
                raise NodeStopped()
            if self.refused is not None:
                raise self.refused
            try:
                return call_with_retry(fn, what, self.backoff, self.rng, sleep=self._sleep)
            except grpc.RpcError as exc:
                reason = reason_of(exc)
                if reason is None:  # not the aggregator's refusal; transient failures were retried already
                    raise
                if reason.action is Action.REREGISTER and not reregistered:
                    log.warning("%s refused (%s): %s; registering again", what, reason, printable(exc.details()))
                    self._register()
                    reregistered = True
                    continue
                if reason.action is Action.GIVE_UP:
                    raise NodeRefused(reason, f"{what}: {exc.details()}") from exc
                raise

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise NodeStopped()

    def _register(self) -> pb.RegisterResponse:
        request = registration(self.cfg, self.prep, session_id=self.session_id)
        response = self._call(
            "Register", lambda: self.stub.Register(request, timeout=self.cfg.rpc_timeout_s), reregister=False
        )
        if response.codec not in CODECS:
            raise NodeRefused(Reason.UNKNOWN_CODEC, f"the aggregator announces codec {response.codec[:40]!r}")
        self.run_id = response.round.run_id
        self.wire = WireConfig(codec=response.codec, delta=response.delta, drop_masked_rows=response.drop_masked_rows)
        self.heartbeat_interval = max(0.5, response.heartbeat_interval_ms / 1000.0)
        self.chunk_bytes = chunk_size(response.max_chunk_bytes)
        self.status.set(phase="in_run", run_id=self.run_id)
        log.info(
            "registered with %s: run %s, %s, codec %s",
            self.cfg.aggregator,
            printable(self.run_id, 64),
            describe_round(response.round),
            response.codec,
        )
        return response

    def _get_round(self, wait_for: int, wait: bool = False) -> pb.RoundInfo:
        """The current round; with ``wait``, long-poll until round ``wait_for`` is open or the run ends."""
        wait_s = self.cfg.long_poll_s if wait else 0.0
        request = pb.GetRoundRequest(
            run_id=self.run_id,
            node_id=self.cfg.node_id,
            wait_for_round=wait_for,
            max_wait_ms=int(wait_s * 1000),
            session_id=self.session_id,
        )
        return self._call(
            "GetRound", lambda: self.stub.GetRound(request, timeout=wait_s + self.cfg.rpc_timeout_s)
        ).round

    def _fetch(self, version: int) -> tuple[pb.PayloadHeader, bytes]:
        """Download global ``version``: transient failures (a stalled stream ends at ``transfer_timeout_s``,
        a message over gRPC's size limit, the network) are retried; a stream that is not a payload as
        announced is a :class:`GlobalRefused`."""

        def fetch() -> tuple[pb.PayloadHeader, bytes]:
            stream = self.stub.FetchGlobal(
                pb.FetchGlobalRequest(run_id=self.run_id, node_id=self.cfg.node_id, version=version),
                timeout=self.cfg.transfer_timeout_s,
            )
            first = next(stream, None)
            if first is None or first.WhichOneof("content") != "header":
                stream.cancel()
                raise GlobalRefused(version, Reason.BAD_STREAM, "the download did not start with a header")
            header = first.header
            if header.version != version:
                stream.cancel()
                raise GlobalRefused(version, Reason.BAD_ROUND_ID, f"the download is version {header.version}")
            try:
                data = assemble((m.chunk for m in stream), header.wire_bytes, MAX_PAYLOAD_BYTES)
            except PayloadAssemblyError as exc:
                stream.cancel()
                raise GlobalRefused(version, exc.reason, str(exc)) from exc
            return header, data

        header, data = self._call(f"FetchGlobal v{version}", fetch)
        encoding = header.codec if header.codec in CODECS else "unknown"  # a bounded label set
        self.t.count_payload("down", encoding, len(data), max(0, header.raw_bytes))
        return header, data

    def _fetch_global(self, version: int, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Global ``version``, decoded against ``reference`` (version - 1) and fully validated.

        A global refused (:class:`GlobalRefused`) changes nothing the node holds; it is fetched again after
        a backoff with jitter, for at most ``give_up_after_s``, then the last refusal is raised.
        """
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                header, data = self._fetch(version)
                t0 = time.perf_counter()
                try:
                    check_wire(data, self.wire)  # the federation's codec and delta mode, as announced
                    decoded = decode_adapter(data, header.sha256, reference, self.wire)
                except CodecError as exc:
                    raise GlobalRefused(version, exc.reason, str(exc)) from exc
                self.t.codec_seconds.labels(operation="decode").observe(time.perf_counter() - t0)
                return decoded.tensors
            except GlobalRefused as exc:
                if time.monotonic() - start > self.backoff.give_up_after_s:
                    raise
                wait = self.backoff.delay(attempt, self.rng)
                log.warning("%s; keeping global v%d, fetching again in %.2fs", exc, version - 1, wait)
                self._sleep(wait)
                attempt += 1

    # -- state -------------------------------------------------------------------------------
    def _load_or_create_state(self) -> NodeState:
        self.store.unarchive(self.run_id)  # a finished run that the aggregator continues (more rounds)
        state = self.store.load()
        if state is not None and (
            state.run_id != self.run_id
            or state.node_id != self.cfg.node_id
            or state.fingerprint != self.prep.fingerprint
        ):
            self.store.archive(state.run_id, f"it belongs to node {state.node_id} in run {state.run_id}, not this one")
            state = None
        if state is None:
            self.learner = build_learner(self.cfg, self.prep)  # a new run starts from the seeds, as the simulation
            state = NodeState(
                run_id=self.run_id,
                node_id=self.cfg.node_id,
                fingerprint=self.prep.fingerprint,
                global_version=0,
                global_state={k: v.clone() for k, v in self.initial.items()},
            )
            self.store.save(state, wait=True)
            return state
        if state.learner is not None:
            self.learner.load_private_state(state.learner)
        log.info(
            "resumed from %s: global version %d, trained through round %d, evaluated version %d%s",
            self.store.path,
            state.global_version,
            state.trained_round + 1,
            state.evaluated_version,
            f", update of round {state.pending.round_id + 1} pending" if state.pending else "",
        )
        return state

    def _save(self, wait: bool = False) -> None:
        assert self.state is not None
        if not self.evaluator:
            self.state.learner = self.learner.private_state()
        self.store.save(self.state, wait=wait)

    # -- the steps of a round ----------------------------------------------------------------
    def _catch_up(self, version: int) -> None:
        state = self.state
        assert state is not None
        while state.global_version < version:
            v = state.global_version + 1
            tensors = self._fetch_global(v, state.global_state)  # a refused global leaves the state as it is
            state.global_state = tensors
            state.global_version = v
        # not saved here: every published version stays on the aggregator, a restarted node fetches it again

    def _evaluate(self, version: int) -> None:
        state = self.state
        assert state is not None
        self.learner.load_adapter_state(state.global_state)
        head = "clip" if self.evaluator else None
        val = None if self.evaluator else self.learner.evaluate(*self.parts["val"])
        test = self.learner.evaluate(*self.parts["test"], head=head)
        self._keep_evaluation(version, val, test)
        shared_val, shared_test = self._shared(val, test)
        request = pb.ReportMetricsRequest(
            run_id=self.run_id,
            node_id=self.cfg.node_id,
            version=version,
            report_id=f"{self.cfg.node_id}-v{version}",
            head=head or self.method.head,
        )
        if shared_val is not None:
            request.val.CopyFrom(metrics_to_proto(shared_val))
        if shared_test is not None:
            request.test.CopyFrom(metrics_to_proto(shared_test))
        shown = val if val is not None else test
        self.t.validation_accuracy.labels(node=self.cfg.node_id).set(shown["accuracy"])
        self._call("ReportMetrics", lambda: self.stub.ReportMetrics(request, timeout=self.cfg.rpc_timeout_s))
        self.store.save_snapshot(Snapshot(self.run_id, version, state.global_state, self._model_state()))
        state.evaluated_version = version
        self.status.set(global_version=version)
        if self.evaluator:
            self._save()  # a trainer saves once a round, after training (a repeated report is recognised)
        log.info(
            "global v%d: %s accuracy %.4f, test %.4f%s",
            version,
            "val" if val is not None else "test",
            shown["accuracy"],
            test["accuracy"],
            "" if self.cfg.share_metrics == "all" else f" (shared with the aggregator: {self.cfg.share_metrics})",
        )

    def _model_state(self) -> dict | None:
        """The private model as it is now, without the optimisers (what predicting needs); None: evaluator."""
        if self.evaluator:
            return None
        return self.learner.private_state() | {"opt_adapter": None, "opt_mlp": None}

    def _follow_selection(self, info: pb.RoundInfo) -> None:
        """Note the run's best version and keep the snapshots that are, or may still become, the best."""
        if self.state is None or info.run_id != self.run_id:
            return
        self.state.best_version = best = int(info.best_version)
        decided = int(info.decided_version)
        self.store.keep_snapshots(lambda v: v == best or v > decided)

    def _await_selection(self, version: int) -> None:
        """After the last round: wait (a bounded while) until every trainer evaluated ``version``, so that the
        run's best version is final; then keep only its snapshot and save."""
        info = None
        end = time.monotonic() + SELECTION_WAIT_S
        request = pb.GetRoundRequest(run_id=self.run_id, node_id=self.cfg.node_id, session_id=self.session_id)
        while time.monotonic() < end:
            try:
                info = self.stub.GetRound(request, timeout=self.cfg.rpc_timeout_s).round
            except grpc.RpcError:
                break  # the aggregator is gone or serves another run: go with what is known
            self._follow_selection(info)
            if info.decided_version >= version:
                break
            self._sleep(1.0)
        self.state.pending = None
        self._save()  # the final global, the private model and the best version: what predict uses
        log.info(
            "run %s: best version %s%s",
            self.run_id,
            self.state.best_version or "none",
            "" if info is not None and info.decided_version >= version else " (not every trainer's evaluation came in)",
        )

    def _shared(self, val: dict | None, test: dict) -> tuple[dict | None, dict | None]:
        """The part of an evaluation this node sends (``share_metrics``): all of it, val accuracy, or nothing."""
        if self.cfg.share_metrics == "all":
            return val, test
        if self.cfg.share_metrics == "val_accuracy" and val is not None:
            return {"n": val["n"], "accuracy": val["accuracy"]}, None
        return None, None

    def _keep_evaluation(self, version: int, val: dict | None, test: dict) -> None:
        """Every evaluation, in full, stays in ``<state_dir>/evaluations.jsonl`` (one line per global version)."""
        line = {"run_id": self.run_id, "version": version, "val": val, "test": test, "shared": self.cfg.share_metrics}
        with open(Path(self.cfg.state_dir) / EVALUATIONS, "a", encoding="utf-8") as f:
            f.write(dumps_strict(line) + "\n")

    def _plan_privacy(self, total_rounds: int) -> None:
        """Differential privacy: fix this run's noise (a resumed run keeps its plan) and say what it is."""
        self.privacy_stopped = None
        if self.evaluator or self.learner.dp is None:
            return
        try:
            plan = self.learner.plan_privacy(len(self.parts["train"][1]), total_rounds)
        except ValueError as exc:  # preflight checked delta; a resumed plan for other data lands here
            raise ConfigError(f"differential privacy: {exc}") from exc
        assert plan is not None
        spent = self.learner.epsilon() or 0.0
        self.t.dp_epsilon.labels(node=self.cfg.node_id).set(spent)
        self.t.dp_delta.labels(node=self.cfg.node_id).set(plan.delta)
        self.t.dp_epsilon_budget.labels(node=self.cfg.node_id).set(plan.budget if plan.budget is not None else math.inf)
        self.t.dp_budget_exhausted.labels(node=self.cfg.node_id).set(0)
        self.status.set(dp_epsilon=spent, dp_budget=plan.budget)
        log.info(
            "differential privacy: noise multiplier %.3f, clip %g, Poisson sampling rate %.4f, %d steps a round, "
            "delta %.2g, %s; epsilon spent so far %.3f",
            plan.noise_multiplier,
            plan.clip,
            plan.sample_rate,
            plan.steps_per_round,
            plan.delta,
            f"budget epsilon {plan.budget:g} over {total_rounds} rounds" if plan.budget is not None else "no budget",
            spent,
        )

    def _train(self, round_id: int) -> None:
        state = self.state
        assert state is not None
        feats, labels = self.parts["train"]
        t0 = time.perf_counter()
        try:
            payload, stats = make_update(self.learner, state.global_state, feats, labels, round_id, self.wire)
        except PrivacyBudgetSpent as exc:
            self.privacy_stopped = str(exc)
            self.t.dp_budget_exhausted.labels(node=self.cfg.node_id).set(1)
            self.status.set(dp_budget_exhausted=True)
            log.error("round %d: %s", round_id + 1, exc)
            return
        self.t.local_train_seconds.observe(stats.seconds)
        self.t.codec_seconds.labels(operation="encode").observe(time.perf_counter() - t0 - stats.seconds)
        state.trained_round = round_id
        state.pending = PendingUpdate(
            round_id=round_id,
            update_id=f"{self.run_id}-{self.cfg.node_id}-r{round_id}",
            payload=payload.data,
            sha256=payload.sha256,
            codec=payload.codec,
            raw_bytes=payload.raw_nbytes,
            train={"steps": stats.steps, "seconds": stats.seconds, "loss": stats.loss}
            | (
                {"dp_epsilon": stats.privacy["epsilon"], "dp_delta": stats.privacy["delta"]}
                if stats.privacy is not None
                else {}
            ),
        )
        if stats.privacy is not None:
            self.t.dp_epsilon.labels(node=self.cfg.node_id).set(stats.privacy["epsilon"])
            self.status.set(dp_epsilon=stats.privacy["epsilon"])
        # on disk before the upload, with the private model that made it: a node killed now re-sends these
        # bytes and resumes with that model, it does not retrain
        self._save(wait=True)
        log.info(
            "round %d: trained %d steps in %.2fs, loss %.4f, update %d bytes%s",
            round_id + 1,
            stats.steps,
            stats.seconds,
            stats.loss,
            len(payload.data),
            ""
            if stats.privacy is None
            else f", epsilon spent {stats.privacy['epsilon']:.3f} (delta {stats.privacy['delta']:.2g})",
        )

    def _upload(self, pending: PendingUpdate, secagg_session: str = "") -> bool:
        """Send one update (a masked input when ``secagg_session`` is set); False when the round moved on
        without it."""
        header = pb.PayloadHeader(
            run_id=self.run_id,
            round_id=pending.round_id,
            node_id=self.cfg.node_id,
            update_id=pending.update_id,
            version=pending.round_id,
            codec=pending.codec,
            delta=self.wire.delta,
            raw_bytes=pending.raw_bytes,
            wire_bytes=len(pending.payload),
            sha256=pending.sha256,
            num_train_samples=len(self.parts["train"][1]),
            secagg_session=secagg_session,
        )
        if self.cfg.share_metrics == "all":  # steps, seconds and the training loss: metrics too
            header.train.CopyFrom(
                pb.TrainSummary(
                    steps=int(pending.train["steps"]),
                    seconds=pending.train["seconds"],
                    loss=pending.train["loss"],
                    dp_epsilon=pending.train.get("dp_epsilon"),
                    dp_delta=pending.train.get("dp_delta"),
                )
            )

        def messages():
            yield pb.UploadUpdateRequest(header=header)
            for part in chunks(pending.payload, self.chunk_bytes):
                yield pb.UploadUpdateRequest(chunk=part)

        def upload() -> pb.UploadUpdateResponse:
            try:
                return self.stub.UploadUpdate(messages(), timeout=self.cfg.transfer_timeout_s)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.t.count_payload("up", pending.codec, len(pending.payload), pending.raw_bytes)
                reason = reason_of(exc)
                if reason is not None:  # as the aggregator counts it: fedmedclip_updates_rejected_total{reason}
                    self.t.updates_rejected.labels(reason=reason).inc()
                raise

        try:
            ack = self._call(f"UploadUpdate r{pending.round_id}", upload)
        except grpc.RpcError as exc:
            reason = reason_of(exc)
            if reason is None or reason.action is not Action.RESYNC:
                raise
            # the round closed without us, or it holds an update of ours already: go on with the current round
            log.warning("update of round %d not taken (%s): %s", pending.round_id + 1, reason, printable(exc.details()))
            return False
        self.t.count_payload("up", pending.codec, len(pending.payload), pending.raw_bytes)
        self.t.updates_accepted.inc()
        log.info(
            "round %d: update accepted%s (%d in)",
            pending.round_id + 1,
            " (replayed)" if ack.replayed else "",
            ack.updates_received,
        )
        self._keep_receipt(pending, ack)
        return True

    def _secure_upload(self, pending: PendingUpdate) -> bool:
        """The round's update through secure aggregation (hospital_node/secure.py): masked, never in the clear."""
        if self.tls is None:
            raise NodeRefused(Reason.SECAGG, "secure aggregation needs this node's certificate and key (mTLS)")
        link = SecureLink(
            self.cfg.node_id,
            self.run_id,
            self.session_id,
            self.stub,
            self.tls,
            self._call,
            self.cfg.long_poll_s,
            self.cfg.rpc_timeout_s,
            self.secagg_answered,
        )
        trained = {k: v.detach().clone() for k, v in self.learner.adapter_state().items()}
        encode = adapter_encoder(self.cfg.node_id, trained, self.state.global_state, self.wire.drop_masked_rows)

        def upload(masked, session: str) -> bool:
            data = masked.astype("<u4").tobytes()
            sent = replace(
                pending,
                update_id=f"{pending.update_id}-{session}",
                payload=data,
                sha256=sha256_hex(data),
                codec="secagg",
            )
            return self._upload(sent, secagg_session=session)

        return SecureUploader(link, pending.round_id, encode, upload).run()

    def _keep_receipt(self, pending: PendingUpdate, ack: pb.UploadUpdateResponse) -> None:
        """Check the aggregator's signed receipt of an accepted update and keep it (docs/audit.md)."""
        if not ack.receipt:
            log.warning("round %d: the aggregator sent no receipt for the update", pending.round_id + 1)
            return
        expected = {
            "run_id": self.run_id,
            "round_id": pending.round_id,
            "node": self.cfg.node_id,
            "update_id": pending.update_id,
            "sha256": pending.sha256,
        }
        path, problem = keep_receipt(self.cfg.state_dir, ack.receipt, ack.receipt_signature, self.audit_key, expected)
        round_no, checked = pending.round_id + 1, "verified" if self.audit_key else "kept (no audit_pub to check it)"
        if problem is not None:
            log.error("round %d: the aggregator's receipt does not hold (%s); kept in %s", round_no, problem, path)
        else:
            log.info("round %d: receipt %s in %s", round_no, checked, path)

    # -- heartbeat ---------------------------------------------------------------------------
    def _heartbeat_loop(self, done: threading.Event) -> None:
        request = pb.HeartbeatRequest(run_id=self.run_id, node_id=self.cfg.node_id, session_id=self.session_id)
        while not done.wait(self.heartbeat_interval):
            try:
                self.stub.Heartbeat(request, timeout=self.cfg.rpc_timeout_s)
            except grpc.RpcError as exc:
                if reason_of(exc) is Reason.SESSION_REPLACED:  # another process is this node now: stop
                    self.refused = NodeRefused(Reason.SESSION_REPLACED, f"Heartbeat: {exc.details()}")
                    return
                log.debug("heartbeat failed: %s", exc.code())

    def _log_traffic(self, what: str) -> None:
        """One line per round: every byte this node sent and received, by RPC (not only the adapters)."""
        t = self.t.traffic.take()
        if t["up"] or t["down"]:
            by_rpc = ", ".join(f"{rpc} {v['up']}/{v['down']}" for rpc, v in t["by_rpc"].items())
            log.info("%s: sent %d bytes, received %d (sent/received by RPC: %s)", what, t["up"], t["down"], by_rpc)

    # -- runs --------------------------------------------------------------------------------
    def run(self) -> int:
        """Follow runs until stopped: after a run ends, archive its state and wait for the federation's next
        run (``once``: return the run's exit code instead). A refusal for good ends the process."""
        try:
            while True:
                code = self._follow_run()
                if self.cfg.once or self.stop.is_set() or code == ExitCode.REFUSED:
                    return code
                if self.run_over:
                    self.store.archive(self.run_id, "the run is over")
                self._wait_for_next_run()
        except NodeStopped:
            log.info("stopped; private state under %s", self.store.dir)
            return ExitCode.OK
        except NodeRefused as exc:  # while waiting between runs
            log.error("refused by the aggregator: %s", exc)
            return ExitCode.REFUSED
        finally:
            self.channel.close()
            self.store.flush()  # the saves still in the background land before the process ends

    def _wait_for_next_run(self) -> None:
        """Wait (for as long as it takes) until the aggregator serves a run this node can join: another run,
        or the same one again if it was not over (the aggregator restarted, or the node gave up on it)."""
        previous, over = self.run_id, self.run_over
        self.status.set(phase="waiting_for_next_run")
        log.info(
            "%s; waiting for the federation's next run (Ctrl-C or SIGTERM stops the node; once: true exits instead)",
            f"run {previous} is over" if over else f"left run {previous or '(none joined yet)'}",
        )
        request = pb.GetRoundRequest(run_id=previous, node_id=self.cfg.node_id, session_id=self.session_id)
        attempt = 0
        while True:
            if self.stop.is_set():
                raise NodeStopped()
            try:
                info = self.stub.GetRound(request, timeout=self.cfg.rpc_timeout_s).round
                if not over or info.phase not in (pb.ROUND_PHASE_FINISHED, pb.ROUND_PHASE_FAILED):
                    return  # the run goes on: join it again
            except grpc.RpcError as exc:
                reason = reason_of(exc)
                if reason in (Reason.WRONG_RUN, Reason.UNKNOWN_NODE):
                    log.info("the aggregator serves a new run: joining it")
                    return
                if reason is Reason.SESSION_REPLACED or (reason is not None and reason.action is Action.GIVE_UP):
                    raise NodeRefused(reason, f"GetRound: {exc.details()}") from exc
                log.debug("aggregator not answering (%s); waiting for the next run", exc.code())
            self._sleep(self.backoff.delay(attempt, self.rng))  # grows to retry_max_s: a poll every few seconds
            attempt += 1

    def _follow_run(self) -> int:
        """Take part in the aggregator's current run until it ends; its exit code."""
        done = threading.Event()
        heartbeat: threading.Thread | None = None
        self.run_over = False
        try:
            first = self._register()
            self.state = self._load_or_create_state()
            # secure aggregation: the unmaskings this node answered in this run (hospital_node/secure.py)
            try:
                self.secagg_answered = Answered(Path(self.cfg.state_dir) / "secagg_answered.json", self.run_id)
            except SecAggError as exc:
                log.error("secure aggregation: %s", exc)
                return ExitCode.FAILED
            self._plan_privacy(first.round.total_rounds)
            heartbeat = threading.Thread(target=self._heartbeat_loop, args=(done,), name="heartbeat", daemon=True)
            heartbeat.start()
            info = first.round
            wait_for = 0
            while True:
                if wait_for:
                    info = self._get_round(wait_for, wait=True)
                if info.run_id != self.run_id:
                    log.error(
                        "the aggregator started another run (%s); this node's run was %s",
                        printable(info.run_id, 64),
                        printable(self.run_id, 64),
                    )
                    self.run_over = True
                    return ExitCode.RUN_CHANGED
                if info.phase == pb.ROUND_PHASE_FAILED:
                    log.error("the run failed: %s", printable(info.message, 1000))
                    self.run_over = True
                    return ExitCode.FAILED
                if info.phase == pb.ROUND_PHASE_WAITING_FOR_NODES:
                    info = self._get_round(0, wait=True)  # long-polls until the first round opens
                    wait_for = 0
                    continue
                version = info.global_version
                self._catch_up(version)
                self.t.round_current.set(version)
                self.status.set(global_version=version)
                if version >= 1 and self.state.evaluated_version < version:
                    self._evaluate(version)
                self._follow_selection(info)
                if info.phase == pb.ROUND_PHASE_FINISHED:
                    self._await_selection(version)
                    self._log_traffic(f"run {self.run_id}, after round {version}")
                    log.info("run %s finished after %d rounds", self.run_id, version)
                    self.run_over = True
                    return ExitCode.OK
                if info.phase != pb.ROUND_PHASE_COLLECTING:
                    wait_for = version + 1
                    continue
                if not self.evaluator and not self.privacy_stopped:
                    r = info.round_id
                    if self.state.trained_round < r:
                        self._train(r)
                    pending = self.state.pending
                    if pending is not None and pending.round_id == r and not info.update_accepted:
                        if self.cfg.secure_aggregation:
                            self._secure_upload(pending)
                        else:
                            self._upload(pending)
                self._log_traffic(f"round {info.round_id + 1}")
                wait_for = info.round_id + 1
        except GlobalRefused as exc:
            log.error(
                "no global the node can take for %.0fs (%s); stopping with its state as it was",
                self.backoff.give_up_after_s,
                exc,
            )
            return ExitCode.FAILED
        except RetriesExhausted as exc:
            log.error("the aggregator did not answer: %s", exc)
            return ExitCode.FAILED
        except NodeRefused as exc:
            if exc.reason is Reason.WRONG_RUN:
                log.error("the aggregator runs another run than this node's %s: %s", self.run_id, exc)
                self.run_over = True
                return ExitCode.RUN_CHANGED
            log.error("refused by the aggregator: %s", exc)
            return ExitCode.REFUSED
        finally:
            done.set()
            # a heartbeat still inside an RPC when the channel closes and the interpreter exits aborts
            # the process from gRPC's C++ core ("terminate called without an active exception")
            if heartbeat is not None and heartbeat.is_alive():
                heartbeat.join(timeout=self.cfg.rpc_timeout_s + 1)


def run_node(
    cfg: NodeConfig,
    stop: threading.Event,
    telemetry: Telemetry,
    tls: TlsMaterial | None,
    status: NodeStatus | None = None,
    setup: Setup | None = None,
) -> int:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    status = status or NodeStatus(cfg.node_id)
    status.set(phase="encoding")
    prep = prepare(cfg, telemetry, setup)
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    return NodeClient(cfg, prep, telemetry, stop, tls, status).run()
