"""The aggregator's refusal: a request it will not serve, and why (a :class:`shared.wire.reasons.Reason`)."""

from __future__ import annotations

import grpc

from shared.errors import FedMedCLIPError
from shared.wire.reasons import Reason


class EngineError(FedMedCLIPError):
    """A refused request: ``reason`` fixes the gRPC status code and the metrics label, ``message`` goes to the node."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message

    @property
    def code(self) -> grpc.StatusCode:
        return self.reason.code
