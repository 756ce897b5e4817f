"""Image datasets, de-duplication and federated partitions for FedMedCLIP.

The learning core never walks folders itself: it receives a :class:`Dataset`
(an immutable list of ``(path, label, sha256)`` samples plus the label space)
and a list of :class:`HospitalData` describing which sample indices each
simulated hospital owns and how those are split into train/val/test.

Two properties matter more than anything else here and are enforced in code:

* **No leakage through duplicates.** Public medical image sets often contain
  byte-identical copies of the same image under different names, sometimes in
  both the training and the test folder. Every sample therefore carries the
  SHA-256 of its bytes; :func:`deduplicate` keeps one sample per hash, and
  :func:`build_federation` refuses a dataset that still contains duplicates,
  so equal bytes can never land on two sides of a split or in two hospitals.
* **One label space for the whole federation.** A class index must mean the
  same disease at every hospital, so every loader accepts the federation's
  ``class_names`` and fails loudly on a class it does not know instead of
  silently renumbering.

All user-caused failures raise a subclass of :class:`DataError` whose message
names the offending file or folder, so a service can report it verbatim.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from shared.errors import FedMedCLIPError

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_ENV_VAR",
    "IMAGE_EXTENSIONS",
    "DataConfigError",
    "DataError",
    "Dataset",
    "DuplicateReport",
    "EmptyDatasetError",
    "HospitalData",
    "ManifestError",
    "MissingInputError",
    "Sample",
    "Split",
    "UnknownClassError",
    "UnreadableImageError",
    "build_federation",
    "deduplicate",
    "default_data_root",
    "dirichlet_partition",
    "load_image",
    "read_manifest",
    "read_split_manifest",
    "scan_hospital_folders",
    "scan_image_folder",
    "split_indices",
    "subset",
]

#: File name suffixes (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})

#: Environment variable that overrides where the bundled brain tumor MRI set lies.
DATA_ENV_VAR = "FEDMEDCLIP_DATA"

_HASH_CHUNK = 1 << 20
_HASH_WORKERS = 8


# --------------------------------------------------------------------------- errors


class DataError(FedMedCLIPError):
    """Base class of every data-loading error; the message names the file or folder."""


class MissingInputError(DataError):
    """A root folder, manifest or image file that was asked for does not exist."""


class EmptyDatasetError(DataError):
    """A folder or manifest exists but yields no usable image."""


class UnreadableImageError(DataError):
    """A file exists but cannot be decoded as an image (corrupt, truncated, not an image)."""


class ManifestError(DataError):
    """A CSV manifest is malformed: missing column, blank or unknown label, repeated path."""


class UnknownClassError(DataError):
    """A class folder is not part of the label space the federation agreed on."""


class DataConfigError(DataError, ValueError):
    """Invalid partitioning/splitting parameters (fractions, alpha, sizes).

    Also a :class:`ValueError`, because it is usually a programming or
    configuration mistake rather than bad data.
    """


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Sample:
    """One labelled image: absolute path, class index and SHA-256 of its bytes."""

    path: Path
    label: int
    sha256: str


@dataclass(frozen=True)
class Dataset:
    """An immutable, ordered collection of samples over a fixed label space.

    ``root`` is where the samples were scanned from (``None`` for datasets
    assembled elsewhere); :func:`deduplicate` uses it to tell which top-level
    folder (e.g. ``Training`` vs ``Testing``) each duplicate lies in.
    """

    samples: tuple[Sample, ...]
    class_names: tuple[str, ...]
    root: Path | None = None

    def __post_init__(self) -> None:
        if len(set(self.class_names)) != len(self.class_names):
            raise DataConfigError(f"class names must be unique, got {list(self.class_names)}")
        n = len(self.class_names)
        for s in self.samples:
            if not 0 <= s.label < n:
                raise DataError(
                    f"{s.path}: label {s.label} is outside the label space of {n} classes"
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self) -> np.ndarray:
        """Class index of every sample, as an ``int64`` array aligned with ``samples``."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    def paths(self) -> list[Path]:
        return [s.path for s in self.samples]

    def hashes(self) -> list[str]:
        return [s.sha256 for s in self.samples]

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name, including classes with zero samples."""
        counts = np.bincount(self.labels(), minlength=self.num_classes)
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def select(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """A new dataset with the samples at ``indices`` (in that order), same label space."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Dataset(tuple(self.samples[int(i)] for i in idx), self.class_names, self.root)


@dataclass
class DuplicateReport:
    """What :func:`deduplicate` found and removed.

    ``n_removed`` counts every sample that did not survive: all but one member
    of each consistent group, plus every member of a conflicting group.
    ``groups`` lists every group of byte-identical files (paths sorted), so an
    audit can see exactly what was dropped.
    """

    n_files: int
    n_unique: int
    n_groups: int
    n_removed: int
    n_cross_folder_groups: int
    n_conflicting_groups: int
    n_conflicting_files: int = 0
    groups: tuple[tuple[Path, ...], ...] = ()
    conflicting_groups: tuple[tuple[Path, ...], ...] = ()

    @property
    def examples(self) -> tuple[tuple[Path, ...], ...]:
        """A few duplicate groups, for log lines and reports."""
        return self.groups[:5]

    def summary(self) -> str:
        return (
            f"{self.n_files} files, {self.n_unique} distinct contents, "
            f"{self.n_groups} duplicate groups ({self.n_cross_folder_groups} spanning top-level "
            f"folders, {self.n_conflicting_groups} with conflicting labels), "
            f"{self.n_removed} samples removed"
        )


def _frozen_indices(values: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.array(values, dtype=np.int64).reshape(-1)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Split:
    """Train/val/test indices (sorted, disjoint, read-only arrays).

    Compared by identity: element-wise array comparison has no single truth value.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            object.__setattr__(self, name, _frozen_indices(getattr(self, name)))

    def all(self) -> np.ndarray:
        return np.concatenate([self.train, self.val, self.test])


@dataclass(frozen=True, eq=False)
class HospitalData:
    """One simulated hospital: the dataset indices it owns and how they are split.

    ``split`` holds indices into the *dataset* (subsets of ``indices``). A
    held-out hospital never trains: all its indices are in ``split.test``.
    """

    name: str
    indices: np.ndarray
    split: Split
    held_out: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", _frozen_indices(self.indices))


# --------------------------------------------------------------------------- scanning


def default_data_root() -> Path:
    """Where the bundled brain tumor MRI set lies.

    ``$FEDMEDCLIP_DATA`` if set, else ``<repo>/../shared/data/brain-tumor-mri``,
    resolved from this file so it works from any clone placed beside ``shared/``.
    """
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-mri"


def _is_image(path: Path) -> bool:
    # Hidden files are skipped: on real data they are macOS "._x.jpg" resource
    # forks or editor leftovers, never images someone meant to label.
    return (
        not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
    )


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


def _resolve_class_names(
    found: Sequence[str], class_names: Sequence[str] | None, where: Path
) -> tuple[str, ...]:
    if class_names is None:
        return tuple(sorted(set(found)))
    names = tuple(class_names)
    if len(set(names)) != len(names):
        raise DataConfigError(f"class_names has repeated entries: {list(names)}")
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise UnknownClassError(
            f"{where}: class folder(s) {unknown} are not in the label space {list(names)}"
        )
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
                raise ManifestError(
                    f"manifest {csv_file}: missing column(s) {missing}; header is {header}"
                )
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest {csv_file} is not UTF-8 text: {exc}") from exc

    entries: list[tuple[Path, str]] = []
    seen: dict[Path, int] = {}
    for line, row in rows:
        raw_path = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip()
        if not raw_path or not label:
            raise ManifestError(f"manifest {csv_file}, line {line}: empty path or label")
        path = Path(raw_path).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if path in seen:
            raise ManifestError(
                f"manifest {csv_file}, line {line}: {path} already listed on line {seen[path]}"
            )
        seen[path] = line
        if not path.is_file():
            raise MissingInputError(
                f"manifest {csv_file}, line {line}: image file {path} does not exist"
            )
        entries.append((path, label))
    if not entries:
        raise EmptyDatasetError(f"manifest {csv_file} lists no images")

    labels_seen = [label for _, label in entries]
    if class_names is None:
        names = tuple(sorted(set(labels_seen)))
    else:
        names = tuple(class_names)
        if len(set(names)) != len(names):
            raise DataConfigError(f"class_names has repeated entries: {list(names)}")
        for (path, label), (line, _) in zip(entries, rows):
            if label not in names:
                raise ManifestError(
                    f"manifest {csv_file}, line {line}: label {label!r} of {path} "
                    f"is not in the label space {list(names)}"
                )
    index = {name: i for i, name in enumerate(names)}
    entries.sort(key=lambda e: e[0].as_posix())
    hashes = _hash_all([p for p, _ in entries])
    samples = tuple(Sample(p, index[lab], h) for (p, lab), h in zip(entries, hashes))
    return Dataset(samples, names, root=base)


# --------------------------------------------------------------------------- images


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB without losing the picture.

    Alpha is composited onto black (the background of a scan) rather than
    dropped, and high bit-depth grayscale is rescaled to its own range instead
    of being clipped at 255, which would turn most 16-bit scans white.
    """
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: Path | str) -> Image.Image:
    """Decode an image fully and return it as RGB.

    Decoding is forced here (PIL is lazy) so that a truncated or corrupt file
    fails with :class:`UnreadableImageError` naming it, at load time, instead
    of as an obscure error deep inside a training loop.
    """
    p = Path(path)
    if not p.exists():
        raise MissingInputError(f"image file {p} does not exist")
    if not p.is_file():
        raise UnreadableImageError(f"{p} is not a regular file")
    try:
        with Image.open(p) as img:
            img.load()
            return _to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(f"cannot decode image {p}: {exc}") from exc


# --------------------------------------------------------------------------- de-duplication


def _top_level(path: Path, root: Path) -> str:
    """The first folder below ``root`` holding ``path`` (its own folder if outside ``root``)."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return path.parent.as_posix()
    return rel.parts[0] if len(rel.parts) > 1 else ""


def deduplicate(ds: Dataset, root: Path | str | None = None) -> tuple[Dataset, DuplicateReport]:
    """Keep one sample per content hash so equal bytes can never leak across a split.

    Within each group of byte-identical samples, the one with the smallest
    path is kept. A group whose members carry different labels is dropped
    entirely: no label for it can be trusted. "Cross-folder" groups are those
    whose members lie under different top-level folders of ``root`` (default:
    ``ds.root``, else the common folder of all samples), e.g. Training vs
    Testing. The surviving samples keep their original order.
    """
    if root is not None:
        base = Path(root).expanduser().resolve()
    elif ds.root is not None:
        base = ds.root
    elif len(ds):
        base = Path(os.path.commonpath([str(s.path) for s in ds.samples]))
    else:
        base = Path(".")

    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(ds.samples):
        by_hash[s.sha256].append(i)

    keep: set[int] = set()
    groups: list[tuple[Path, ...]] = []
    conflicting: list[tuple[Path, ...]] = []
    n_cross = 0
    n_conflicting_files = 0
    for members in by_hash.values():
        if len(members) == 1:
            keep.add(members[0])
            continue
        members = sorted(members, key=lambda i: ds.samples[i].path.as_posix())
        paths = tuple(ds.samples[i].path for i in members)
        groups.append(paths)
        if len({_top_level(p, base) for p in paths}) > 1:
            n_cross += 1
        if len({ds.samples[i].label for i in members}) > 1:
            conflicting.append(paths)
            n_conflicting_files += len(members)
            logger.warning("dropping %d identical files with conflicting labels: %s", len(paths), paths)
            continue
        keep.add(members[0])

    groups.sort(key=lambda g: g[0].as_posix())
    conflicting.sort(key=lambda g: g[0].as_posix())
    kept = tuple(s for i, s in enumerate(ds.samples) if i in keep)
    report = DuplicateReport(
        n_files=len(ds),
        n_unique=len(by_hash),
        n_groups=len(groups),
        n_removed=len(ds) - len(kept),
        n_cross_folder_groups=n_cross,
        n_conflicting_groups=len(conflicting),
        n_conflicting_files=n_conflicting_files,
        groups=tuple(groups),
        conflicting_groups=tuple(conflicting),
    )
    logger.info("deduplicate: %s", report.summary())
    return Dataset(kept, ds.class_names, ds.root), report


# --------------------------------------------------------------------------- splits and partitions


def _as_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataConfigError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataConfigError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``n`` that are each within 1 of ``n * fraction``."""
    exact = [n * f for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_indices(
    labels: np.ndarray | Sequence[int],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> Split:
    """Seeded, per-class stratified train/val/test split of positions ``0..len(labels)-1``.

    Each class is shuffled and cut with largest-remainder rounding, so every
    part gets its fraction of every class to within one sample and class
    balance is the same in train, val and test.
    """
    y = _as_labels(labels)
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 or not np.isfinite(f) for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DataConfigError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        bounds = np.cumsum(_largest_remainder(len(members), fr))
        for part, chunk in zip(parts, np.split(members, bounds[:-1])):
            part.append(chunk)
    train, val, test = (np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts)
    return Split(train, val, test)


def dirichlet_partition(
    labels: np.ndarray | Sequence[int],
    n_parts: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed partition of positions ``0..len(labels)-1`` into ``n_parts`` parts.

    The usual non-IID benchmark recipe (Hsu et al. 2019; NIID-Bench): for each
    class, draw part proportions from ``Dir(alpha)`` and cut that class's
    shuffled samples accordingly; a part already holding its fair share
    (``N / n_parts``) gets no more, which keeps sizes reasonable. Draws are
    repeated until every part holds at least ``min_size`` samples. Small
    ``alpha`` means each part is dominated by few classes; large ``alpha``
    approaches IID. Deterministic for a given seed.
    """
    y = _as_labels(labels)
    n = len(y)
    if n_parts < 1:
        raise DataConfigError(f"n_parts must be >= 1, got {n_parts}")
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataConfigError(f"alpha must be a positive number, got {alpha}")
    if min_size < 0:
        raise DataConfigError(f"min_size must be >= 0, got {min_size}")
    if n_parts * min_size > n:
        raise DataConfigError(
            f"cannot give {n_parts} parts at least {min_size} samples each from {n} samples"
        )
    if n_parts == 1:
        return [_frozen_indices(np.arange(n))]

    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for attempt in range(1, max_tries + 1):
        parts: list[list[int]] = [[] for _ in range(n_parts)]
        for cls in classes:
            members = rng.permutation(np.flatnonzero(y == cls))
            props = rng.dirichlet(np.full(n_parts, alpha))
            open_parts = np.array([len(p) < n / n_parts for p in parts], dtype=np.float64)
            masked = props * open_parts
            if not np.isfinite(masked).all() or masked.sum() <= 0:
                masked = props if np.isfinite(props).all() and props.sum() > 0 else open_parts
            masked = masked / masked.sum()
            cuts = (np.cumsum(masked) * len(members)).astype(np.int64)[:-1]
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            logger.debug("dirichlet_partition: alpha=%s accepted after %d draw(s)", alpha, attempt)
            return [_frozen_indices(np.sort(np.asarray(p, dtype=np.int64))) for p in parts]
    raise DataConfigError(
        f"no Dirichlet(alpha={alpha}) partition of {n} samples into {n_parts} parts gave every "
        f"part >= {min_size} samples in {max_tries} draws; raise alpha or lower min_size"
    )


def _iid_partition(n: int, n_parts: int, seed: int) -> list[np.ndarray]:
    if n_parts < 1 or n_parts > n:
        raise DataConfigError(f"cannot split {n} samples into {n_parts} non-empty IID parts")
    perm = np.random.default_rng(seed).permutation(n)
    return [_frozen_indices(np.sort(p)) for p in np.array_split(perm, n_parts)]


def _derived_seed(seed: int, *keys: int) -> int:
    """An independent, reproducible seed for one hospital, derived from the run seed."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def build_federation(
    ds: Dataset,
    *,
    n_hospitals: int,
    alpha: float | None,
    holdout: bool = True,
    seed: int = 0,
    partition: str = "dirichlet",
    min_size: int = 10,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
) -> list[HospitalData]:
    """Split one pooled dataset into simulated hospitals.

    ``n_hospitals`` training hospitals (``hospital_1`` ...) each get a seeded
    stratified train/val/test split of their own samples. With ``holdout``,
    one more part is drawn the same way and returned last as ``global``: a
    test-only hospital that never trains, to measure generalisation to an
    unseen site. ``partition`` is ``"dirichlet"`` (label skew, needs
    ``alpha``) or ``"iid"`` (equal-size uniform random parts).

    The dataset must be de-duplicated first (see :func:`deduplicate`); a
    dataset with repeated content hashes is refused, because identical images
    in two parts would leak test data into training.
    """
    if n_hospitals < 1:
        raise DataConfigError(f"n_hospitals must be >= 1, got {n_hospitals}")
    if len(ds) == 0:
        raise EmptyDatasetError(f"dataset from {ds.root} has no samples to partition")
    hashes = ds.hashes()
    if len(set(hashes)) != len(hashes):
        raise DataError(
            f"dataset from {ds.root} holds {len(hashes) - len(set(hashes))} duplicate image(s); "
            "call deduplicate() before build_federation() so copies cannot leak across splits"
        )
    n_parts = n_hospitals + (1 if holdout else 0)
    labels = ds.labels()
    if partition == "dirichlet":
        if alpha is None:
            raise DataConfigError("partition 'dirichlet' needs alpha (e.g. 0.1 skewed, 100 near IID)")
        parts = dirichlet_partition(labels, n_parts, alpha, seed=seed, min_size=min_size)
    elif partition == "iid":
        parts = _iid_partition(len(ds), n_parts, seed)
    else:
        raise DataConfigError(f"unknown partition {partition!r}; expected 'dirichlet' or 'iid'")

    hospitals: list[HospitalData] = []
    for i, idx in enumerate(parts):
        empty = np.empty(0, np.int64)
        if holdout and i == n_parts - 1:
            hospitals.append(HospitalData("global", idx, Split(empty, empty, idx), held_out=True))
            continue
        local = split_indices(labels[idx], fractions, seed=_derived_seed(seed, i))
        split = Split(idx[local.train], idx[local.val], idx[local.test])
        hospitals.append(HospitalData(f"hospital_{i + 1}", idx, split, held_out=False))
    for h in hospitals:
        logger.info(
            "%s: %d samples (train %d / val %d / test %d), classes %s",
            h.name,
            len(h.indices),
            len(h.split.train),
            len(h.split.val),
            len(h.split.test),
            np.bincount(labels[h.indices], minlength=ds.num_classes).tolist(),
        )
    return hospitals


def subset(ds: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """A small stratified sample: up to ``per_class`` random samples of every class.

    Kept in the dataset's order, so a subset of a sorted scan is still sorted.
    """
    if per_class < 1:
        raise DataConfigError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    labels = ds.labels()
    chosen: list[np.ndarray] = []
    for cls in range(ds.num_classes):
        members = np.flatnonzero(labels == cls)
        if len(members):
            chosen.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    if not chosen:
        return Dataset((), ds.class_names, ds.root)
    return ds.select(np.sort(np.concatenate(chosen)))


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
    ``split`` column the second value is None; a blank or unknown split raises
    :class:`ManifestError`.
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
    for i, sample in enumerate(ds.samples):
        parts[by_path[sample.path]].append(i)
    return ds, Split(*(np.asarray(parts[name], dtype=np.int64) for name in SPLIT_NAMES))
