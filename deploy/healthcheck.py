"""Container health check (Docker HEALTHCHECK, compose healthcheck): exit 0 when healthy, 1 when not.

    python deploy/healthcheck.py grpc 127.0.0.1:50052 [SERVICE]   grpc.health.v1 Check (the aggregator)
    python deploy/healthcheck.py http http://127.0.0.1:9101/healthz  an HTTP 200 (a node's /healthz)
    python deploy/healthcheck.py                                   the check named by $FEDMEDCLIP_HEALTHCHECK

The aggregator's health service is NOT_SERVING until its state is loaded and the service port is
open, so this check (and a Kubernetes ``grpc:`` probe on the same port) only passes once it can work.
A hospital node is a gRPC client with no server of its own: its /healthz, beside /metrics, says what it
does (encoding, in_run, waiting_for_next_run) with HTTP 200 for as long as the daemon lives.
Needs only the image's own packages (grpcio-health-checking), no grpc_health_probe binary.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def check_grpc(address: str, service: str = "", timeout_s: float = 3.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:  # the health port is plaintext, like a kubelet probe
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return False
    ok = response.status == health_pb2.HealthCheckResponse.SERVING
    if not ok:
        print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}", file=sys.stderr)
    return ok


def check_http(url: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return False


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv) or os.environ.get("FEDMEDCLIP_HEALTHCHECK", "").split()
    if not args or args[0] not in ("grpc", "http") or len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    ok = check_grpc(args[1], args[2] if len(args) > 2 else "") if args[0] == "grpc" else check_http(args[1])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
