"""`qnext-health`: exit 0 when a qnext server reports SERVING on grpc.health.v1, else 1.

For container health checks (the Dockerfiles' HEALTHCHECK, compose) where no grpc_health_probe binary is
installed: the server is NOT_SERVING until its worker is ready and again while it drains, so this is a
readiness check as much as a liveness one. Against a TLS server give --tls or --ssl-ca-certs (and the client
certificate for mutual TLS); health needs no API key, but --api-key is accepted like the other clients'.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qnext.rpc.security import ClientSecurity, add_client_security_flags, client_security, make_channel
from qnext.worker.cli_help import HelpFormatter


def check(target: str, service: str, timeout: float, security: ClientSecurity | None = None) -> tuple[bool, str]:
    with make_channel(target, security, aio=False) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        except grpc.RpcError as e:
            return False, f"{target}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qnext-health", description="grpc.health.v1 check of a qnext server.",
                                formatter_class=HelpFormatter)
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the gRPC server")
    p.add_argument("--service", default="", help="service name to ask about (default: '', the whole server)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    add_client_security_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        security = client_security(args)
    except ValueError as e:  # named by its flag
        print(f"qnext-health: {e}", file=sys.stderr)
        return 2
    ok, line = check(args.target, args.service, args.timeout, security)
    print(line, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
