"""Typed errors shared by the learning core and the services.

Every error a user can cause with bad input derives from :class:`FedMedCLIPError`,
so a service can turn it into a typed status instead of crashing.
"""


class FedMedCLIPError(Exception):
    """Base class of every error FedMedCLIP raises on bad input or configuration."""
