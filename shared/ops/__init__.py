"""Operations: configuration, logging, exit codes, shutdown, telemetry, atomic files, run reports.

Nothing here trains a model; :mod:`shared.ops.telemetry` is the only module that imports gRPC.
"""
