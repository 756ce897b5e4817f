"""Finding labelled images: ImageFolder trees, per-hospital folders, CSV manifests (with or without splits)."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from shared.data.errors import (
    DataConfigError,
    DataError,
    EmptyDatasetError,
    ManifestError,
    MissingInputError,
    UnknownClassError,
    UnreadableImageError,
)
from shared.data.records import Dataset, Sample, Split

logger = logging.getLogger(__name__)

#: File name suffixes (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

#: Environment variable that overrides where the bundled brain tumor MRI set lies.
DATA_ENV_VAR = "FEDMEDCLIP_DATA"

_HASH_CHUNK = 1 << 20
_HASH_WORKERS = 8


def default_data_root() -> Path:
    """Where the bundled brain tumor MRI set lies.

    ``$FEDMEDCLIP_DATA`` if set, else ``<repo>/../shared/data/brain-tumor-mri``,
    resolved from this file so it works from any clone placed beside ``shared/``.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "data" / "brain-tumor-mri"
    if beside_checkout.is_dir():
        return beside_checkout
    return Path.cwd().parent / "shared" / "data" / "brain-tumor-mri"  # an installed package, run from a checkout


def _is_image(path: Path) -> bool:
    # Hidden files are skipped: on real data they are macOS "._x.jpg" resource
    # forks or editor leftovers, never images someone meant to label.
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _require_dir(root: Path | str, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise MissingInputError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise MissingInputError(f"{what} {path} is not a folder")
    return path.resolve()


def _class_folders(root: Path) -> list[tuple[str, Path]]:
    """Find ``(class_name, folder)`` pairs under ``root``.

    Two layouts are accepted, so that a dataset shipped as ``Training/`` plus
    ``Testing/`` can be pooled and re-split without leakage:

    * ImageFolder: ``root/<class>/<image>`` -- some subfolder holds images directly;
    * split layout: ``root/<split>/<class>/<image>`` -- no subfolder holds images
      directly, but their subfolders do.

    Images must lie directly in a class folder; deeper folders are ignored
    (and logged), because guessing whether they are patients or splits would
    silently change labels. Hidden folders (``.ipynb_checkpoints`` ...) are
    never classes or splits.
    """
    subdirs = _visible_dirs(root)
    if any(_images_in(d) for d in subdirs):
        pairs = [(d.name, d) for d in subdirs]
    else:
        pairs = []
        for split_dir in subdirs:
            for class_dir in _visible_dirs(split_dir):
                if _visible_dirs(class_dir) and not _images_in(class_dir):
                    raise DataError(
                        f"{class_dir}: images nested too deep; expected "
                        f"root/<class>/<image> or root/<split>/<class>/<image> under {root}"
                    )
                pairs.append((class_dir.name, class_dir))
    for _, folder in pairs:
        nested = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if nested:
            logger.warning(
                "%s: ignoring sub-folder(s) %s; images must lie directly in a class folder",
                folder,
                nested,
            )
    return pairs


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise MissingInputError(f"image file {path} does not exist") from exc
    except OSError as exc:
        raise UnreadableImageError(f"cannot read {path}: {exc}") from exc
    return digest.hexdigest()


def _hash_all(paths: Sequence[Path]) -> list[str]:
    """SHA-256 of every file, in input order; threads overlap the disk reads."""
    if len(paths) < 64:
        return [_sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=_HASH_WORKERS) as pool:
        return list(pool.map(_sha256_file, paths))


def _resolve_class_names(found: Sequence[str], class_names: Sequence[str] | None, where: Path) -> tuple[str, ...]:
    if class_names is None:
        return tuple(sorted(set(found)))
    names = tuple(class_names)
    if len(set(names)) != len(names):
        raise DataConfigError(f"class_names has repeated entries: {list(names)}")
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise UnknownClassError(f"{where}: class folder(s) {unknown} are not in the label space {list(names)}")
    return names


def scan_image_folder(root: Path | str, class_names: Sequence[str] | None = None) -> Dataset:
    """Scan an ImageFolder tree (or a folder of ImageFolder splits) into a :class:`Dataset`.

    Without ``class_names`` the label space is the sorted set of class folder
    names (pooled across splits). With ``class_names`` -- the federation's
    agreed label space -- labels follow that order, classes missing here are
    allowed (hospitals rarely see every disease) and an unknown class folder
    raises :class:`UnknownClassError`. Samples are ordered by path relative to
    ``root``, so the result is identical on every machine.
    """
    root_path = _require_dir(root, "dataset root")
    stray = _images_in(root_path)
    if stray:
        logger.warning("%s: ignoring %d image(s) outside any class folder", root_path, len(stray))
    pairs = _class_folders(root_path)
    if not pairs:
        raise EmptyDatasetError(f"{root_path}: no class folders found")
    names = _resolve_class_names([n for n, _ in pairs], class_names, root_path)
    index = {name: i for i, name in enumerate(names)}

    found: list[tuple[str, Path, int]] = []
    for name, folder in pairs:
        images = _images_in(folder)
        if not images:
            logger.warning("%s: class folder holds no images", folder)
        for img in images:
            found.append((img.relative_to(root_path).as_posix(), img, index[name]))
    if not found:
        raise EmptyDatasetError(f"{root_path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    found.sort(key=lambda t: t[0])

    hashes = _hash_all([p for _, p, _ in found])
    samples = tuple(Sample(p, lab, h) for (_, p, lab), h in zip(found, hashes))
    ds = Dataset(samples, names, root_path)
    logger.info("scanned %s: %d images, classes %s", root_path, len(ds), ds.class_counts())
    return ds


def scan_hospital_folders(root: Path | str) -> list[tuple[str, Dataset]]:
    """Scan a "natural" federation: ``root/<hospital>/<ImageFolder or splits>``.

    Every hospital gets the same label space (the sorted union of all class
    folders), so label ``i`` means the same class everywhere. Hospitals are
    returned sorted by folder name.
    """
    root_path = _require_dir(root, "federation root")
    hospitals = _visible_dirs(root_path)
    if not hospitals:
        raise EmptyDatasetError(f"{root_path}: no hospital folders found")
    union: set[str] = set()
    for folder in hospitals:
        union.update(name for name, _ in _class_folders(folder))
    if not union:
        raise EmptyDatasetError(f"{root_path}: no class folders under any hospital")
    names = tuple(sorted(union))
    return [(folder.name, scan_image_folder(folder, names)) for folder in hospitals]


def scan_sites(root: Path | str) -> Dataset:
    """A natural federation ``root/<site>/<ImageFolder or splits>`` as one dataset whose samples name their
    ``site`` (the folder), over the union label space; ordered by path below ``root``, like a folder scan."""
    root_path = _require_dir(root, "federation root")
    sites = scan_hospital_folders(root_path)
    samples = tuple(replace(s, site=name) for name, ds in sites for s in ds.samples)
    return Dataset(samples, sites[0][1].class_names, root_path)


def read_manifest(
    csv_path: Path | str,
    class_names: Sequence[str] | None = None,
    root: Path | str | None = None,
) -> Dataset:
    """Read a CSV manifest with (at least) the columns ``path`` and ``label``.

    ``label`` is a class name. Relative paths are resolved against ``root``
    if given, else against the CSV's own folder, so a manifest can travel with
    its images. Samples are ordered by resolved path, like a folder scan, so
    the same files give the same dataset regardless of row order.

    Optional columns: ``group`` (a patient, lesion or study id: images of one group never land on two
    sides of a split or in two hospitals; a blank cell makes the image a group of its own) and ``site``
    (the hospital of the image, for ``--partition natural``; a blank cell is refused).
    """
    csv_file = Path(csv_path).expanduser()
    if not csv_file.is_file():
        raise MissingInputError(f"manifest {csv_file} does not exist")
    base = _require_dir(root, "manifest root") if root is not None else csv_file.resolve().parent

    try:
        with csv_file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise ManifestError(f"manifest {csv_file}: missing column(s) {missing}; header is {header}")
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {csv_file} is not UTF-8 text: {exc}") from exc

    has_site = "site" in header
    entries: list[tuple[Path, str, str | None, str | None]] = []  # path, label, group, site
    seen: dict[Path, int] = {}
    for line, row in rows:
        raw_path = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        if not raw_path or not label:
            raise ManifestError(f"manifest {csv_file}, line {line}: empty path or label")
        path = Path(raw_path).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if path in seen:
            raise ManifestError(f"manifest {csv_file}, line {line}: {path} already listed on line {seen[path]}")
        seen[path] = line
        if not path.is_file():
            raise MissingInputError(f"manifest {csv_file}, line {line}: image file {path} does not exist")
        group = (row.get("group") or "").strip() or None
        site = (row.get("site") or "").strip() or None
        if has_site and site is None:
            raise ManifestError(f"manifest {csv_file}, line {line}: empty site for {path}")
        entries.append((path, label, group, site))
    if not entries:
        raise EmptyDatasetError(f"manifest {csv_file} lists no images")

    labels_seen = [e[1] for e in entries]
    if class_names is None:
        names = tuple(sorted(set(labels_seen)))
    else:
        names = tuple(class_names)
        if len(set(names)) != len(names):
            raise DataConfigError(f"class_names has repeated entries: {list(names)}")
        for (path, label, _, _), (line, _) in zip(entries, rows):
            if label not in names:
                raise ManifestError(
                    f"manifest {csv_file}, line {line}: label {label!r} of {path} "
                    f"is not in the label space {list(names)}"
                )
    index = {name: i for i, name in enumerate(names)}
    entries.sort(key=lambda e: e[0].as_posix())
    hashes = _hash_all([e[0] for e in entries])
    samples = tuple(Sample(p, index[lab], h, group, site) for (p, lab, group, site), h in zip(entries, hashes))
    return Dataset(samples, names, root=base)


# --------------------------------------------------------------------------- manifests with splits

#: Values of a manifest's optional ``split`` column.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def read_split_manifest(
    csv_path: Path | str,
    class_names: Sequence[str] | None = None,
    root: Path | str | None = None,
) -> tuple[Dataset, Split | None]:
    """:func:`read_manifest`, plus the optional ``split`` column (train/val/test) as a :class:`Split`.

    Indices refer to the returned dataset (ordered by path, like a folder scan), so a manifest
    written from a :class:`HospitalData` reproduces that hospital's split exactly. Without a
    ``split`` column the second value is None; a blank or unknown split, or a group whose images
    lie in two splits, raises :class:`ManifestError`.
    """
    ds = read_manifest(csv_path, class_names, root)
    csv_file = Path(csv_path).expanduser()
    base = Path(root).expanduser().resolve() if root is not None else csv_file.resolve().parent
    with csv_file.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "split" not in header:
            return ds, None
        reader.fieldnames = header
        by_path: dict[Path, str] = {}
        for row in reader:
            path = Path((row.get("path") or "").strip()).expanduser()
            path = (path if path.is_absolute() else base / path).resolve()
            split = (row.get("split") or "").strip().lower()
            if split not in SPLIT_NAMES:
                raise ManifestError(
                    f"manifest {csv_file}, line {reader.line_num}: split {split!r} is not one of {list(SPLIT_NAMES)}"
                )
            by_path[path] = split
    parts: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    split_of_group: dict[str, str] = {}
    for i, sample in enumerate(ds.samples):
        split = by_path[sample.path]
        parts[split].append(i)
        if sample.group is not None and split_of_group.setdefault(sample.group, split) != split:
            raise ManifestError(
                f"manifest {csv_file}: group {sample.group!r} is in both {split_of_group[sample.group]} and {split} "
                f"({sample.path}); a group's images must share one split"
            )
    return ds, Split(*(np.asarray(parts[name], dtype=np.int64) for name in SPLIT_NAMES))
