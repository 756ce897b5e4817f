"""Typed data errors: every message names the offending file or folder."""

from __future__ import annotations

from shared.errors import FedMedCLIPError


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
