"""The feature cache: each image encoded once, keyed by backbone and file content."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from shared.data import scan_image_folder, subset
from shared.data.features import FeatureCache, encode_samples


def _small_folder(brain_tumor_root, tmp_path, per_class=3):
    """A copy of a few real images in a scratch folder we may modify."""
    ds = subset(scan_image_folder(brain_tumor_root / "Training"), per_class, seed=1)
    for s in ds.samples:
        target = tmp_path / "images" / ds.class_names[s.label] / s.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(s.path, target)
    return tmp_path / "images"


def test_second_run_encodes_nothing_and_gives_the_same_features(backbone, brain_tumor_root, tmp_path):
    root = _small_folder(brain_tumor_root, tmp_path)
    ds = scan_image_folder(root)
    first, stats1 = encode_samples(backbone, ds.samples, tmp_path / "cache", progress=False)
    assert stats1.n_encoded == len(ds.samples) == 12 and stats1.n_cached == 0
    second, stats2 = encode_samples(backbone, ds.samples, tmp_path / "cache", progress=False)
    assert stats2.n_encoded == 0 and stats2.n_cached == 12
    assert torch.equal(first, second)
    assert first.shape == (12, 512) and torch.isfinite(first).all()


def test_changed_file_is_encoded_again(backbone, brain_tumor_root, tmp_path):
    root = _small_folder(brain_tumor_root, tmp_path, per_class=1)
    ds = scan_image_folder(root)
    encode_samples(backbone, ds.samples, tmp_path / "cache", progress=False)
    victim = ds.samples[0].path
    replacement = next(p for p in sorted((brain_tumor_root / "Testing" / "glioma").iterdir()) if p.suffix == ".jpg")
    shutil.copyfile(replacement, victim)
    ds2 = scan_image_folder(root)
    _, stats = encode_samples(backbone, ds2.samples, tmp_path / "cache", progress=False)
    assert stats.n_encoded == 1 and stats.n_cached == 3


def test_features_match_direct_encoding_in_float16(backbone, brain_tumor_root, tmp_path):
    from shared.data import load_image

    root = _small_folder(brain_tumor_root, tmp_path, per_class=1)
    ds = scan_image_folder(root)
    feats, _ = encode_samples(backbone, ds.samples, None, progress=False)
    direct = backbone.encode_images(torch.stack([backbone.preprocess(load_image(s.path)) for s in ds.samples]))
    assert torch.allclose(feats, direct.half().float(), atol=1e-3, rtol=1e-3)


def test_another_backbone_never_reads_these_features(backbone, tmp_path):
    a = FeatureCache(tmp_path, backbone.image_fingerprint())
    b = FeatureCache(tmp_path, "0" * 64)
    a.save({"abc": np.ones(4, np.float16)})
    assert "abc" in a.load() and b.load() == {}


def test_corrupt_cache_file_is_rebuilt_not_fatal(backbone, brain_tumor_root, tmp_path):
    root = _small_folder(brain_tumor_root, tmp_path, per_class=1)
    ds = scan_image_folder(root)
    cache = FeatureCache(tmp_path / "cache", backbone.image_fingerprint())
    cache.dir.mkdir(parents=True)
    cache.path.write_bytes(b"not an npz")
    _, stats = encode_samples(backbone, ds.samples, tmp_path / "cache", progress=False)
    assert stats.n_encoded == 4
    assert len(cache.load()) == 4


def test_saves_from_two_writers_keep_each_others_entries(backbone, tmp_path):
    first = FeatureCache(tmp_path, backbone.image_fingerprint())
    second = FeatureCache(tmp_path, backbone.image_fingerprint())
    first.save({"a": np.ones(4, np.float16)})
    second.save({"b": np.zeros(4, np.float16)})  # this writer never read "a"
    entries = first.load()
    assert set(entries) == {"a", "b"} and entries["a"].tolist() == [1.0] * 4


def test_progress_is_reported_per_batch_and_from_the_cache(backbone, brain_tumor_root, tmp_path):
    root = _small_folder(brain_tumor_root, tmp_path, per_class=2)
    ds = scan_image_folder(root)
    seen = []
    encode_samples(backbone, ds.samples, tmp_path / "cache", batch_size=3, progress=False, on_progress=seen.append)
    assert [(p.n_images, p.n_cached, p.n_encoded) for p in seen] == [(8, 0, n) for n in (0, 3, 6, 8)]
    assert seen[-1].n_pending == 0
    seen.clear()
    encode_samples(backbone, ds.samples, tmp_path / "cache", progress=False, on_progress=seen.append)
    assert [(p.n_images, p.n_cached, p.n_encoded, p.n_pending) for p in seen] == [(8, 8, 0, 0)]


def test_an_interrupted_encoder_keeps_what_it_encoded(backbone, brain_tumor_root, tmp_path):
    root = _small_folder(brain_tumor_root, tmp_path, per_class=2)
    ds = scan_image_folder(root)

    def stop_after_two_batches(p):
        if p.n_encoded == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_samples(
            backbone, ds.samples, tmp_path / "cache", batch_size=2, progress=False, on_progress=stop_after_two_batches
        )
    _, stats = encode_samples(backbone, ds.samples, tmp_path / "cache", progress=False)
    assert stats.n_encoded == 4 and stats.n_cached == 4


def test_a_cache_locked_for_too_long_is_a_typed_error(tmp_path):
    from filelock import FileLock

    from shared.data.features import FeatureCacheBusyError

    cache = FeatureCache(tmp_path, "f" * 64, lock_timeout_s=0.2)
    cache.dir.mkdir(parents=True)
    with FileLock(cache.lock_path):  # another writer, stuck
        with pytest.raises(FeatureCacheBusyError, match="held .*features.npz.lock"):
            cache.save({"a": np.ones(4, np.float16)})
    cache.save({"a": np.ones(4, np.float16)})
    assert set(cache.load()) == {"a"}
