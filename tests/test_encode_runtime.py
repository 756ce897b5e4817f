"""Fast encoding: the lookup-table preprocessing, the ONNX Runtime image tower and its cache (issue 13)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from shared import backbone as backbone_module
from shared.backbone import BackboneError, BackboneSpec, load_backbone, resolve_runtime
from shared.data import deduplicate, load_image, scan_image_folder
from shared.data.features import default_read_threads, encode_samples
from shared.data.preprocess import ArrayPreprocess


@pytest.fixture(scope="module")
def real_samples(brain_tumor_root):
    """Real images of every class, grayscale and RGB files among them."""
    samples, _ = deduplicate(scan_image_folder(brain_tumor_root / "Testing"))
    return list(samples.samples[:: max(1, len(samples.samples) // 24)][:24])


@pytest.fixture(scope="module")
def torch_backbone():
    return load_backbone(BackboneSpec(runtime="torch"), device="cpu")


@pytest.fixture(scope="module")
def ort_backbone(tmp_path_factory):
    return load_backbone(BackboneSpec(runtime="onnxruntime"), "cpu", runtime_cache=tmp_path_factory.mktemp("runtime"))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_lookup_preprocessing_is_bit_identical_to_the_transform(torch_backbone, real_samples, tmp_path):
    transform = torch_backbone.preprocess
    fast = ArrayPreprocess.from_transform(transform)
    assert fast is not None and fast.keep_gray
    rng = np.random.default_rng(0)
    odd = []  # shapes and modes the real set lacks: resized and cropped, alpha, 16 bit, palette
    for i, (mode, size) in enumerate([("L", (300, 411)), ("RGB", (517, 260)), ("RGBA", (250, 300)), ("P", (230, 231))]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = tmp_path / f"odd{i}.png"
        Image.fromarray(pixels).convert(mode).save(path)
        odd.append(path)
    wide = tmp_path / "wide16.png"
    Image.fromarray(rng.integers(0, 4000, (240, 330)).astype(np.uint16)).save(wide)
    paths = [s.path for s in real_samples] + odd + [wide]
    modes = {Image.open(p).mode for p in paths}
    assert {"L", "RGB"} <= modes
    expected = torch.stack([transform(load_image(p)) for p in paths]).numpy()
    assert np.array_equal(fast(paths), expected)


def test_a_transform_of_another_shape_is_not_split():
    from torchvision import transforms

    assert ArrayPreprocess.from_transform(transforms.Compose([transforms.ToTensor()])) is None
    assert ArrayPreprocess.from_transform(lambda image: image) is None


def test_onnxruntime_features_match_pytorch_on_real_images(torch_backbone, ort_backbone, real_samples):
    eager, _ = encode_samples(torch_backbone, real_samples, None, progress=False, pipeline="dataloader", num_workers=0)
    fast, _ = encode_samples(ort_backbone, real_samples, None, batch_size=7, progress=False)
    cos = _cosines(eager.numpy(), fast.numpy())
    assert len(cos) == len(real_samples) and cos.min() >= 0.9999, cos.min()


def test_the_threaded_pipeline_gives_the_former_pipelines_features(torch_backbone, real_samples):
    former, _ = encode_samples(torch_backbone, real_samples, None, progress=False, pipeline="dataloader", num_workers=0)
    threaded, _ = encode_samples(torch_backbone, real_samples, None, batch_size=5, progress=False, num_workers=2)
    inline, _ = encode_samples(torch_backbone, real_samples, None, batch_size=5, progress=False, num_workers=0)
    assert torch.allclose(former, threaded, atol=1e-3, rtol=1e-3)  # float16 features, same inputs, same tower
    assert torch.equal(threaded, inline)


def test_images_are_read_where_the_runtime_leaves_room_for_it(torch_backbone, ort_backbone, real_samples):
    # ONNX Runtime keeps every core busy: its batches are read between forward passes (bench/results/encode.md)
    assert default_read_threads(ort_backbone) == 0
    assert default_read_threads(torch_backbone) == 1
    on_gpu = replace(torch_backbone, spec=replace(torch_backbone.spec, runtime="torch"), device=torch.device("cuda"))
    assert default_read_threads(on_gpu) >= 1
    by_default, _ = encode_samples(ort_backbone, real_samples, None, batch_size=5, progress=False)
    beside, _ = encode_samples(ort_backbone, real_samples, None, batch_size=5, progress=False, num_workers=1)
    assert by_default.shape == (len(real_samples), beside.shape[1]) and torch.equal(by_default, beside)


def test_the_fingerprint_names_the_runtime(torch_backbone, ort_backbone, backbone):
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    assert torch_backbone.runtime == "torch" and ort_backbone.runtime == "onnxruntime"
    assert torch_backbone.image_fingerprint() != ort_backbone.image_fingerprint()
    assert torch_backbone.fingerprint(classes) != ort_backbone.fingerprint(classes)
    assert ort_backbone.image_fingerprint(runtime="torch") == torch_backbone.image_fingerprint()
    record = ort_backbone.record(classes)
    assert record["runtime"] == "onnxruntime" and record["spec"]["runtime"] == "onnxruntime"
    assert record["runtime_version"].startswith("onnxruntime ")
    assert backbone.spec.runtime == "onnxruntime"  # the default on a CPU, resolved when loaded


def test_auto_resolves_per_device_and_kind():
    assert resolve_runtime(BackboneSpec(), "cpu") == "onnxruntime"
    assert resolve_runtime(BackboneSpec(), "cuda") == "torch"
    assert resolve_runtime(BackboneSpec(kind="openclip"), "cpu") == "torch"
    with pytest.raises(BackboneError, match="runs on the CPU"):
        resolve_runtime(BackboneSpec(runtime="onnxruntime"), "cuda")
    with pytest.raises(BackboneError, match="unknown runtime"):
        resolve_runtime(BackboneSpec(runtime="tensorrt"), "cpu")


def test_the_exported_tower_is_cached_and_reused(ort_backbone, real_samples, tmp_path, monkeypatch):
    cache = tmp_path / "runtime"
    first = replace(ort_backbone, runtime_cache=cache)  # the same tower, no session yet
    batch = ArrayPreprocess.from_transform(first.preprocess)([s.path for s in real_samples[:4]])
    expected = first.encode_arrays(batch)
    exported = list(cache.rglob("*.onnx"))
    assert len(exported) == 1 and exported[0].parent.parent.name == "onnxruntime"

    def no_export(*_args, **_kwargs):
        raise AssertionError("exported again although the cache holds the tower")

    monkeypatch.setattr(backbone_module, "_export_onnx", no_export)
    second = replace(ort_backbone, runtime_cache=cache)
    assert np.array_equal(second.encode_arrays(batch), expected)
    assert list(cache.rglob("*.onnx")) == exported


def test_a_damaged_cached_tower_is_exported_again(ort_backbone, real_samples, tmp_path):
    cache = tmp_path / "runtime"
    first = replace(ort_backbone, runtime_cache=cache)
    batch = ArrayPreprocess.from_transform(first.preprocess)([s.path for s in real_samples[:2]])
    expected = first.encode_arrays(batch)
    (path,) = cache.rglob("*.onnx")
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    second = replace(ort_backbone, runtime_cache=cache)
    assert np.array_equal(second.encode_arrays(batch), expected)
    assert path.stat().st_size > 1_000_000
