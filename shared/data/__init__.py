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
* **No leakage through patients.** A manifest may name each image's
  ``group`` (a patient, a lesion, a study); splits and partitions deal out
  whole groups, so one patient's images never sit on two sides of a split.
* **One label space for the whole federation.** A class index must mean the
  same disease at every hospital, so every loader accepts the federation's
  ``class_names`` and fails loudly on a class it does not know instead of
  silently renumbering.

All user-caused failures raise a subclass of :class:`DataError` whose message
names the offending file or folder, so a service can report it verbatim.
"""

from shared.data.dedup import deduplicate
from shared.data.errors import (
    DataConfigError,
    DataError,
    EmptyDatasetError,
    ManifestError,
    MissingInputError,
    UnknownClassError,
    UnreadableImageError,
)
from shared.data.images import load_image
from shared.data.partition import (
    build_federation,
    dirichlet_partition,
    natural_federation,
    split_class_counts,
    split_dataset,
    split_indices,
    subset,
)
from shared.data.records import Dataset, DuplicateReport, HospitalData, Sample, Split
from shared.data.scan import (
    DATA_ENV_VAR,
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    default_data_root,
    read_manifest,
    read_split_manifest,
    scan_hospital_folders,
    scan_image_folder,
    scan_sites,
)

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
    "natural_federation",
    "read_manifest",
    "read_split_manifest",
    "scan_hospital_folders",
    "scan_image_folder",
    "scan_sites",
    "split_class_counts",
    "split_dataset",
    "split_indices",
    "subset",
    "SPLIT_NAMES",
]
