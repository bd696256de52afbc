#!/usr/bin/env python3
"""Exit 0 when a teacher server answers the gRPC health check with SERVING, 1 otherwise.

Used where the orchestrator's native gRPC probe cannot be: compose healthchecks, Kubernetes exec
probes when the port speaks TLS (the kubelet's gRPC probe has no TLS), Slurm scripts waiting for
the teacher. Installed in the images as `opd-healthcheck`.

    opd-healthcheck --addr 127.0.0.1:50051 [--tls-ca ca.pem [--tls-cert c.pem --tls-key c.key]
                    [--server-name teacher]] [--wait 600]
"""

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(args) -> bool:
    if args.tls_ca:
        read = lambda p: open(p, "rb").read() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
        opts = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = grpc.secure_channel(args.addr, creds, options=opts)
    else:
        channel = grpc.insecure_channel(args.addr)
    try:
        r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                      timeout=args.timeout)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:50051")
    p.add_argument("--service", default="", help="health service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--tls-ca", default=None, help="CA bundle that signed the server certificate (enables TLS)")
    p.add_argument("--tls-cert", default=None, help="client certificate, for servers that require one")
    p.add_argument("--tls-key", default=None, help="key of --tls-cert")
    p.add_argument("--server-name", default=None, help="name to check the server certificate against")
    p.add_argument("--wait", type=float, default=0.0, help="keep trying this many seconds before failing")
    args = p.parse_args()
    deadline = time.monotonic() + args.wait
    while True:
        if check(args):
            return 0
        if time.monotonic() >= deadline:
            print(f"opd-healthcheck: {args.addr} is not SERVING", file=sys.stderr)
            return 1
        time.sleep(2.0)


if __name__ == "__main__":
    sys.exit(main())
