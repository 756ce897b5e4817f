"""Tests of shared.data on the real brain tumor MRI set and on small synthetic trees."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from shared.data import (
    DataConfigError,
    DataError,
    Dataset,
    EmptyDatasetError,
    ManifestError,
    MissingInputError,
    Sample,
    UnknownClassError,
    UnreadableImageError,
    build_federation,
    deduplicate,
    default_data_root,
    dirichlet_partition,
    load_image,
    read_manifest,
    read_split_manifest,
    scan_hospital_folders,
    scan_image_folder,
    split_class_counts,
    split_dataset,
    split_indices,
    subset,
)
from shared.data.pipeline import prepare_federation
from shared.errors import FedMedCLIPError

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
# Training + Testing counts from the README's table (they sum to 7,019).
README_COUNTS = {"glioma": 1621, "meningioma": 1645, "notumor": 1996, "pituitary": 1757}
# Measured: one survivor per content hash; the set has no label conflicts.
DEDUP_COUNTS = {"glioma": 1620, "meningioma": 1531, "notumor": 1702, "pituitary": 1740}
# The README's "7,020 files" counts this Jupyter leftover, a third byte-identical
# copy of Testing/meningioma/Te-me_0011.jpg in a hidden folder; scans skip it.
CHECKPOINT = "Testing/meningioma/.ipynb_checkpoints/Te-me_0011-checkpoint.jpg"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def brain(brain_tumor_root: Path) -> Dataset:
    """The full pooled scan; hashing 7,020 files once per module keeps the suite fast."""
    return scan_image_folder(brain_tumor_root)


@pytest.fixture(scope="module")
def brain_dedup(brain: Dataset):
    return deduplicate(brain)


def _write_image(path: Path, seed: int, mode: str = "RGB", size: int = 8) -> Path:
    """A small image whose bytes differ per seed, so hashes differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")
    else:
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None
    img.save(path, format=fmt)
    return path


def _image_folder(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    seed = start
    for cls, n in counts.items():
        for i in range(n):
            _write_image(root / cls / f"{cls}_{i:03d}.png", seed)
            seed += 1
    return root


# --------------------------------------------------------------------------- real data


def test_default_data_root_sits_beside_the_repository(monkeypatch):
    monkeypatch.delenv("FEDMEDCLIP_DATA", raising=False)
    expected = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri"
    assert default_data_root() == expected
    monkeypatch.setenv("FEDMEDCLIP_DATA", "/somewhere/else")
    assert default_data_root() == Path("/somewhere/else")


def test_full_scan_pools_training_and_testing_into_7019_images_of_4_classes(brain, brain_tumor_root):
    assert len(brain) == 7019  # 7,020 files minus the hidden notebook checkpoint
    assert brain.class_names == CLASSES
    assert brain.class_counts() == README_COUNTS
    rel = [s.path.relative_to(brain_tumor_root.resolve()).as_posix() for s in brain]
    assert rel == sorted(rel)
    assert {r.split("/")[0] for r in rel} == {"Testing", "Training"}
    assert all(CLASSES[s.label] == s.path.parent.name for s in brain)


def _published_sums(root: Path) -> dict[Path, str]:
    sums = {}
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[(root / name.strip().lstrip("*")).resolve()] = digest
    return sums


def test_scan_hashes_match_published_sha256sums_except_hidden_checkpoint(brain, brain_tumor_root):
    published = _published_sums(brain_tumor_root)
    checkpoint = (brain_tumor_root / CHECKPOINT).resolve()
    assert len(published) == 7020 and checkpoint in published
    assert {s.path: s.sha256 for s in brain} == {p: h for p, h in published.items() if p != checkpoint}


def test_deduplicate_finds_300_groups_426_copies_189_across_training_and_testing(brain_dedup):
    _, report = brain_dedup
    assert report.n_files == 7019
    assert report.n_groups == 300
    assert report.n_removed == 426
    assert report.n_unique == 7019 - 426 == 6593
    assert report.n_cross_folder_groups == 189
    assert report.n_conflicting_groups == 0 and report.n_conflicting_files == 0
    assert len(report.groups) == 300 and all(len(g) >= 2 for g in report.groups)
    assert sum(len(g) - 1 for g in report.groups) == 426


def test_deduplicate_matches_readme_427_when_the_checkpoint_copy_is_counted(brain, brain_tumor_root):
    checkpoint = (brain_tumor_root / CHECKPOINT).resolve()
    extra = Sample(checkpoint, CLASSES.index("meningioma"), _published_sums(brain_tumor_root)[checkpoint])
    with_checkpoint = Dataset(brain.samples + (extra,), brain.class_names, brain.root)
    _, report = deduplicate(with_checkpoint)
    assert (report.n_files, report.n_groups, report.n_removed) == (7020, 300, 427)
    assert report.n_cross_folder_groups == 189


def test_deduplicated_set_has_each_hash_once_and_keeps_first_path(brain_dedup):
    ds, report = brain_dedup
    hashes = ds.hashes()
    assert len(ds) == 6593 and len(set(hashes)) == len(hashes)
    assert ds.class_counts() == DEDUP_COUNTS
    kept = set(ds.paths())
    for group in report.groups:
        assert group[0] in kept and not (set(group[1:]) & kept)


def test_federation_never_shares_an_image_between_splits_or_hospitals(brain_dedup):
    ds, _ = brain_dedup
    hashes = np.array(ds.hashes())
    hospitals = build_federation(ds, n_hospitals=4, alpha=0.5, seed=3)
    seen: set[str] = set()
    for h in hospitals:
        parts = [set(hashes[p]) for p in (h.split.train, h.split.val, h.split.test)]
        for a, b in itertools.combinations(parts, 2):
            assert not a & b, h.name
        mine = set().union(*parts)
        assert len(mine) == len(h.indices)
        assert not mine & seen, h.name
        seen |= mine
    assert len(seen) == len(ds)


def test_federation_refuses_a_dataset_that_still_has_duplicates(brain):
    with pytest.raises(DataError, match="deduplicate"):
        build_federation(brain, n_hospitals=3, alpha=1.0)


def test_grayscale_mri_slice_loads_as_rgb(brain):
    gray = next(s.path for s in brain if Image.open(s.path).mode == "L")
    img = load_image(gray)
    assert img.mode == "RGB" and img.size == (224, 224)
    arr = np.asarray(img)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


# --------------------------------------------------------------------------- image conversion


def test_load_image_converts_palette_alpha_and_16bit_to_rgb(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.save(tmp_path / "p.png")
    Image.new("RGBA", (4, 4), (200, 100, 50, 0)).save(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(tmp_path / "i16.png")

    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 20, 30)
    # Fully transparent pixels become black background, not their hidden colour.
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (0, 0, 0)
    deep = np.asarray(load_image(tmp_path / "i16.png"))
    assert deep.shape == (2, 2, 3) and deep.max() == 255 and deep.min() == 0


# --------------------------------------------------------------------------- splits


def test_split_is_60_20_20_per_class_disjoint_and_covering():
    labels = np.repeat(np.arange(4), [101, 57, 13, 250])
    split = split_indices(labels, seed=7)
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert len(all_idx) == len(labels) and len(np.unique(all_idx)) == len(labels)
    for cls in range(4):
        n = int((labels == cls).sum())
        for part, frac in ((split.train, 0.6), (split.val, 0.2), (split.test, 0.2)):
            assert abs(int((labels[part] == cls).sum()) - n * frac) <= 1


def test_split_is_reproducible_per_seed_and_changes_with_seed():
    labels = np.repeat(np.arange(3), 40)
    a, b, c = split_indices(labels, seed=1), split_indices(labels, seed=1), split_indices(labels, seed=2)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "val", "test"))
    assert not np.array_equal(a.train, c.train)


def test_split_rejects_fractions_that_do_not_sum_to_one():
    with pytest.raises(DataConfigError):
        split_indices(np.zeros(10, dtype=int), fractions=(0.5, 0.2, 0.2))


# --------------------------------------------------------------------------- partitions


def _labels_4x500() -> np.ndarray:
    return np.repeat(np.arange(4), 500)


def test_dirichlet_partition_is_disjoint_covering_and_respects_min_size():
    labels = _labels_4x500()
    parts = dirichlet_partition(labels, n_parts=5, alpha=0.1, seed=0, min_size=25)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert min(len(p) for p in parts) >= 25


def test_dirichlet_partition_is_deterministic_per_seed():
    labels = _labels_4x500()
    a = dirichlet_partition(labels, 4, 0.5, seed=11)
    b = dirichlet_partition(labels, 4, 0.5, seed=11)
    c = dirichlet_partition(labels, 4, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_smaller_alpha_gives_stronger_label_skew():
    labels = _labels_4x500()

    def mean_max_share(alpha: float) -> float:
        shares = []
        for seed in range(5):
            for p in dirichlet_partition(labels, 5, alpha, seed=seed):
                shares.append(np.bincount(labels[p], minlength=4).max() / len(p))
        return float(np.mean(shares))

    skewed, near_iid = mean_max_share(0.1), mean_max_share(100.0)
    assert skewed > 0.6 and near_iid < 0.35 and skewed > near_iid + 0.25


def test_dirichlet_partition_with_impossible_min_size_fails_clearly():
    with pytest.raises(DataConfigError, match="at least 50"):
        dirichlet_partition(np.zeros(100, dtype=int), n_parts=3, alpha=1.0, min_size=50)


def test_build_federation_holds_out_a_test_only_global_hospital(tmp_path):
    ds = scan_image_folder(_image_folder(tmp_path, {"a": 60, "b": 60, "c": 60}))
    hospitals = build_federation(ds, n_hospitals=3, alpha=1.0, seed=0, min_size=10)
    assert [h.name for h in hospitals] == ["hospital_1", "hospital_2", "hospital_3", "global"]
    glob = hospitals[-1]
    assert glob.held_out and len(glob.split.train) == 0 and len(glob.split.val) == 0
    assert np.array_equal(glob.split.test, glob.indices)
    for h in hospitals[:-1]:
        assert not h.held_out
        assert np.array_equal(np.sort(h.split.all()), h.indices)
    assert np.array_equal(np.sort(np.concatenate([h.indices for h in hospitals])), np.arange(len(ds)))


def test_iid_federation_without_holdout_gives_equal_sized_hospitals(tmp_path):
    ds = scan_image_folder(_image_folder(tmp_path, {"a": 30, "b": 30}))
    hospitals = build_federation(ds, n_hospitals=4, alpha=None, holdout=False, partition="iid")
    assert [len(h.indices) for h in hospitals] == [15, 15, 15, 15]
    assert not any(h.held_out for h in hospitals)
    with pytest.raises(DataConfigError):
        build_federation(ds, n_hospitals=2, alpha=None)  # dirichlet needs alpha


def test_subset_takes_per_class_samples_reproducibly(brain_dedup):
    ds, _ = brain_dedup
    small = subset(ds, per_class=5, seed=1)
    assert small.class_counts() == {c: 5 for c in CLASSES}
    assert subset(ds, per_class=5, seed=1) == small


# --------------------------------------------------------------------------- layouts and manifests


def test_scan_pools_split_folders_and_matches_extensions_case_insensitively(tmp_path):
    _write_image(tmp_path / "train" / "cat" / "x.JPG", 1)
    _write_image(tmp_path / "train" / "dog" / "y.png", 2)
    _write_image(tmp_path / "test" / "dog" / "z.Tiff", 3)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    ds = scan_image_folder(tmp_path)
    assert ds.class_names == ("cat", "dog")
    assert [s.path.name for s in ds] == ["z.Tiff", "x.JPG", "y.png"]  # sorted by relative path
    assert ds.labels().tolist() == [1, 0, 1]


def test_scan_uses_the_federation_label_space_and_rejects_unknown_classes(tmp_path):
    root = _image_folder(tmp_path / "site", {"b": 2})
    ds = scan_image_folder(root, class_names=["a", "b", "c"])
    assert ds.class_names == ("a", "b", "c") and set(ds.labels().tolist()) == {1}
    with pytest.raises(UnknownClassError, match="'b'") as err:
        scan_image_folder(root, class_names=["a", "c"])
    assert str(root.resolve()) in str(err.value)


def test_hospital_folders_share_the_union_label_space(tmp_path):
    _image_folder(tmp_path / "site_b", {"flu": 2, "ok": 1}, start=0)
    _image_folder(tmp_path / "site_a" / "Training", {"covid": 1, "ok": 2}, start=10)
    sites = scan_hospital_folders(tmp_path)
    assert [name for name, _ in sites] == ["site_a", "site_b"]
    assert all(ds.class_names == ("covid", "flu", "ok") for _, ds in sites)
    assert sites[0][1].class_counts() == {"covid": 1, "flu": 0, "ok": 2}


def test_manifest_resolves_relative_paths_against_its_folder_and_root(tmp_path):
    _write_image(tmp_path / "imgs" / "a.png", 1)
    _write_image(tmp_path / "imgs" / "b.png", 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,site\nimgs/b.png,tumor,x\nimgs/a.png,healthy,x\n")
    ds = read_manifest(manifest)
    assert ds.class_names == ("healthy", "tumor")
    assert [(s.path.name, s.label) for s in ds] == [("a.png", 0), ("b.png", 1)]

    elsewhere = tmp_path / "lists" / "m.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_text("path,label\na.png,tumor\n")
    ds2 = read_manifest(elsewhere, class_names=["healthy", "tumor"], root=tmp_path / "imgs")
    assert ds2[0].path == (tmp_path / "imgs" / "a.png").resolve() and ds2[0].label == 1
    assert ds2[0].sha256 == ds[0].sha256


# --------------------------------------------------------------------------- typed errors


def test_missing_root_raises_missing_input_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingInputError, match="nowhere"):
        scan_image_folder(missing)


def test_empty_folder_raises_empty_dataset_naming_it(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError, match="empty"):
        scan_image_folder(tmp_path / "empty")


def test_corrupt_jpeg_raises_unreadable_image_naming_it(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" + bytes(range(256)))
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(MissingInputError, match="gone.jpg"):
        load_image(tmp_path / "gone.jpg")


def test_manifest_with_unknown_label_raises_naming_file_and_label(tmp_path):
    _write_image(tmp_path / "a.png", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,zebra\n")
    with pytest.raises(ManifestError, match="zebra") as err:
        read_manifest(manifest, class_names=["healthy", "tumor"])
    assert "m.csv" in str(err.value) and "line 2" in str(err.value)


def test_manifest_without_label_column_raises_manifest_error(tmp_path):
    manifest = tmp_path / "nolabel.csv"
    manifest.write_text("path,diagnosis\na.png,tumor\n")
    with pytest.raises(ManifestError, match=r"nolabel\.csv.*label"):
        read_manifest(manifest)


def test_manifest_listing_a_missing_file_raises_missing_input(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nghost.png,tumor\n")
    with pytest.raises(MissingInputError, match="ghost.png"):
        read_manifest(manifest)
    with pytest.raises(MissingInputError, match="absent.csv"):
        read_manifest(tmp_path / "absent.csv")


def test_every_data_error_is_a_fedmedclip_error():
    for cls in (
        MissingInputError,
        EmptyDatasetError,
        UnreadableImageError,
        ManifestError,
        UnknownClassError,
        DataConfigError,
    ):
        assert issubclass(cls, DataError) and issubclass(cls, FedMedCLIPError)


def test_deduplicate_drops_groups_whose_copies_disagree_on_the_label(tmp_path):
    same = _write_image(tmp_path / "Training" / "a" / "x.png", 1).read_bytes()
    (tmp_path / "Testing" / "a").mkdir(parents=True)
    (tmp_path / "Testing" / "a" / "x_copy.png").write_bytes(same)  # consistent, cross-folder
    conflict = _write_image(tmp_path / "Training" / "a" / "y.png", 2).read_bytes()
    (tmp_path / "Training" / "b").mkdir(parents=True)
    (tmp_path / "Training" / "b" / "y_relabelled.png").write_bytes(conflict)
    _write_image(tmp_path / "Training" / "b" / "z.png", 3)

    ds, report = deduplicate(scan_image_folder(tmp_path))
    assert [s.path.relative_to(tmp_path.resolve()).as_posix() for s in ds] == [
        "Testing/a/x_copy.png",  # first by sorted path wins
        "Training/b/z.png",
    ]
    assert (report.n_groups, report.n_removed, report.n_cross_folder_groups) == (2, 3, 1)
    assert report.n_conflicting_groups == 1 and report.n_conflicting_files == 2
    assert {p.name for p in report.conflicting_groups[0]} == {"y.png", "y_relabelled.png"}


# --------------------------------------------------------------------------- groups (patients) and natural sites


def _grouped_manifest(
    path: Path, ds: Dataset, *, per_class: int = 60, seed: int = 0, sites: tuple[str, ...] = (), extra=()
) -> Path:
    """A manifest of real brain tumor images with made-up patient ids: groups of 5-10 images of one class,
    four groups holding two classes (a patient with two findings), and optionally a site per group."""
    rng = np.random.default_rng(seed)
    labels = ds.labels()
    groups: list[list[int]] = []
    for cls in range(ds.num_classes):
        members = rng.choice(np.flatnonzero(labels == cls), size=per_class, replace=False)
        start = 0
        while start < len(members):
            size = int(rng.integers(5, 11))
            groups.append([int(i) for i in members[start : start + size]])
            start += size
    names = [f"patient_{g:03d}" for g in range(len(groups))]
    first_of_class = [next(g for g, m in enumerate(groups) if labels[m[0]] == cls) for cls in range(ds.num_classes)]
    for k in range(ds.num_classes):  # the first group of each class shares its id with the first of the next class
        names[first_of_class[(k + 1) % ds.num_classes]] = names[first_of_class[k]] = f"mixed_{k}"
    site_of = {name: sites[int(rng.integers(len(sites)))] for name in names} if sites else {}
    lines = ["path,label,group" + (",site" if sites else "")]
    rows = [(ds.samples[i], name) for members, name in zip(groups, names) for i in members] + list(extra)
    for sample, name in rows:
        site = f",{site_of.get(name, sites[0])}" if sites else ""
        lines.append(f"{sample.path},{ds.class_names[sample.label]},{name}{site}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _parts_of_groups(ds: Dataset, parts: dict[str, np.ndarray]) -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for part, idx in parts.items():
        for i in idx:
            where.setdefault(ds.samples[int(i)].group, set()).add(part)
    return where


def _split_parts(split) -> dict[str, np.ndarray]:
    return {"train": split.train, "val": split.val, "test": split.test}


def test_group_split_never_puts_a_patient_on_two_sides_and_stays_stratified(brain_dedup, tmp_path):
    ds = read_manifest(_grouped_manifest(tmp_path / "patients.csv", brain_dedup[0]))
    assert ds.has_groups and len(ds) == 240 and len(set(ds.group_ids().tolist())) < 240 / 4
    labels = ds.labels()
    for seed in range(5):
        split = split_dataset(ds, seed=seed)
        assert np.array_equal(np.sort(split.all()), np.arange(len(ds)))  # disjoint and covering
        where = _parts_of_groups(ds, _split_parts(split))
        assert all(len(parts) == 1 for parts in where.values()), {g: p for g, p in where.items() if len(p) > 1}
        achieved = split_class_counts(labels, split, ds.num_classes)
        for part, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            for cls, n in enumerate(achieved[part]):
                assert abs(n - frac * 60) <= 10, (seed, part, cls, achieved)  # within one group of the target
    # the same data split image by image cuts patients: what the grouped split prevents
    naive = split_indices(labels, seed=0)
    assert any(len(parts) > 1 for parts in _parts_of_groups(ds, _split_parts(naive)).values())


def test_pooled_partition_keeps_each_patient_in_one_hospital_after_deduplication(brain_dedup, brain, tmp_path):
    dup_group = next(g for g in deduplicate(brain)[1].groups if len(g) == 2)
    by_path = {s.path: s for s in brain}
    copies = [(by_path[dup_group[0]], "copy_a"), (by_path[dup_group[1]], "copy_b")]  # equal bytes, two patients
    manifest = _grouped_manifest(tmp_path / "patients.csv", brain_dedup[0], extra=copies)
    for partition, alpha in (("dirichlet", 0.5), ("iid", None)):
        fed = prepare_federation(manifest, hospitals=3, alpha=alpha, seed=1, partition=partition)
        assert fed.duplicates.n_removed == 1  # de-duplication ran first: one copy left
        ds = fed.dataset
        assert len(ds) == 241 and [h.name for h in fed.hospitals][-1] == "global"
        hospital_of: dict[str, str] = {}
        for h in fed.hospitals:
            where = _parts_of_groups(ds, _split_parts(h.split))
            assert all(len(parts) == 1 for parts in where.values()), (partition, h.name)
            for group in where:
                assert hospital_of.setdefault(group, h.name) == h.name, (partition, group)
        assert np.array_equal(np.sort(np.concatenate([h.indices for h in fed.hospitals])), np.arange(len(ds)))


def test_natural_sites_from_a_manifest_hold_out_the_named_site(brain_dedup, tmp_path):
    manifest = _grouped_manifest(tmp_path / "sites.csv", brain_dedup[0], sites=("north", "south", "east"), seed=3)
    fed = prepare_federation(manifest, hospitals=99, alpha=None, partition="natural", holdout="south")
    ds = fed.dataset
    assert [h.name for h in fed.hospitals] == ["east", "north", "south"]  # training sites by name, held-out last
    assert [h.held_out for h in fed.hospitals] == [False, False, True]
    for h in fed.hospitals:
        assert {ds.samples[int(i)].site for i in h.indices} == {h.name}
        where = _parts_of_groups(ds, _split_parts(h.split))
        assert all(len(parts) == 1 for parts in where.values()), h.name
    south = fed.hospitals[-1]
    assert len(south.split.train) == len(south.split.val) == 0 and np.array_equal(south.split.test, south.indices)
    with pytest.raises(DataConfigError, match="west"):
        prepare_federation(manifest, hospitals=3, alpha=None, partition="natural", holdout="west")
    with pytest.raises(DataConfigError, match="--holdout SITE"):
        prepare_federation(manifest, hospitals=3, alpha=None, partition="natural", holdout=True)
    with pytest.raises(DataConfigError, match="only --partition natural"):
        prepare_federation(manifest, hospitals=3, alpha=0.5, holdout="south")


def test_natural_partition_refuses_a_patient_at_two_sites_and_a_manifest_without_sites(brain_dedup, tmp_path):
    ds = brain_dedup[0]
    a, b = ds.samples[0], ds.samples[1]
    two_sites = tmp_path / "two.csv"
    two_sites.write_text(
        f"path,label,group,site\n{a.path},{ds.class_names[a.label]},p1,x\n{b.path},{ds.class_names[b.label]},p1,y\n"
    )
    with pytest.raises(DataError, match="'p1' lies at sites 'x' and 'y'"):
        prepare_federation(two_sites, hospitals=1, alpha=None, partition="natural", holdout=False)
    no_sites = tmp_path / "pooled.csv"
    no_sites.write_text(f"path,label\n{a.path},{ds.class_names[a.label]}\n")
    with pytest.raises(DataError, match="site column"):
        prepare_federation(no_sites, hospitals=1, alpha=None, partition="natural", holdout=False)
    bad_name = tmp_path / "bad.csv"
    bad_name.write_text(f"path,label,site\n{a.path},{ds.class_names[a.label]},../up\n")
    with pytest.raises(DataError, match="1-64 characters"):
        prepare_federation(bad_name, hospitals=1, alpha=None, partition="natural", holdout=False)


def test_natural_folder_layout_names_hospitals_after_their_sites(tmp_path):
    _image_folder(tmp_path / "beta", {"flu": 12, "ok": 8}, start=0)
    _image_folder(tmp_path / "alpha", {"ok": 15}, start=100)
    _image_folder(tmp_path / "gamma" / "Training", {"covid": 6, "flu": 4}, start=200)
    fed = prepare_federation(tmp_path, hospitals=1, alpha=None, partition="natural", holdout="beta")
    assert fed.dataset.class_names == ("covid", "flu", "ok")
    assert [(h.name, h.held_out, len(h.indices)) for h in fed.hospitals] == [
        ("alpha", False, 15),
        ("gamma", False, 10),
        ("beta", True, 20),
    ]


def test_a_split_column_that_cuts_a_patient_is_refused(brain_dedup, tmp_path):
    ds = brain_dedup[0]
    a, b = ds.samples[0], ds.samples[1]
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"path,label,split,group\n{a.path},{ds.class_names[a.label]},train,p7\n"
        f"{b.path},{ds.class_names[b.label]},test,p7\n"
    )
    with pytest.raises(ManifestError, match="group 'p7' is in both train and test"):
        read_split_manifest(manifest)


def test_a_node_splits_its_own_patients_like_the_simulation(brain_dedup, tmp_path):
    from hospital_node.data import load_local

    manifest = _grouped_manifest(tmp_path / "mine.csv", brain_dedup[0], seed=5)
    local = load_local(manifest, split_seed=4)
    expected = split_dataset(read_manifest(manifest), seed=4)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(local.split, part), getattr(expected, part))
    assert all(len(p) == 1 for p in _parts_of_groups(local.dataset, _split_parts(local.split)).values())


def test_partition_writes_one_manifest_per_site_that_a_node_reads_back(brain_dedup, tmp_path):
    from hospital_node.data import PARTITION, load_local
    from shared.ops.command import main_for

    manifest = _grouped_manifest(tmp_path / "sites.csv", brain_dedup[0], sites=("north", "south"), seed=2)
    argv = ["--data", str(manifest), "--partition", "natural", "--holdout", "north", "--out", str(tmp_path / "fed")]
    assert main_for(PARTITION, argv, "fedmedclip partition") == 0
    summary = json.loads((tmp_path / "fed" / "federation.json").read_text())
    assert [(h["name"], h["held_out"]) for h in summary["hospitals"]] == [("south", False), ("north", True)]
    assert yaml.safe_load((tmp_path / "fed" / "north.yaml").read_text())["role"] == "evaluator"
    fed = prepare_federation(manifest, hospitals=3, alpha=None, partition="natural", holdout="north")
    for h, written in zip(fed.hospitals, summary["hospitals"]):
        assert written["split_class_counts"] == split_class_counts(fed.dataset.labels(), h.split, 4)
        local = load_local(tmp_path / "fed" / f"{h.name}.csv", evaluator=h.held_out)
        assert local.counts() == (len(h.split.train), len(h.split.val), len(h.split.test))
        assert local.dataset.has_groups
        assert [s.path for s in local.dataset.select(local.split.train)] == [
            fed.dataset.samples[int(i)].path for i in h.split.train
        ]
