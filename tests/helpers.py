"""Test helpers: free ports, service processes, in-process interceptor chains."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """A service started as `python -m services.<name>` with the given environment."""

    def __init__(self, name: str, env: dict[str, str], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_serving(self, service: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} not SERVING after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._log.close()


class _Details(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, metadata: Sequence[Any]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class _Metadatum:
    def __init__(self, key: str, value: str) -> None:
        self.key = key
        self.value = value


class Intercepted:
    """A servicer seen through server interceptors, for grpcio-testing (which has none).

    Each method runs the interceptors' wrapping exactly as the real server does."""

    def __init__(
        self, servicer: Any, service: str, interceptors: Iterable[grpc.ServerInterceptor]
    ) -> None:
        self._servicer = servicer
        self._service = service
        self._interceptors = list(interceptors)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)

        def call(request: Any, context: Any) -> Any:
            metadata = [_Metadatum(k, v) for k, v in context.invocation_metadata()]
            details = _Details(f"/{self._service}/{name}", metadata)

            def innermost(_details: Any) -> grpc.RpcMethodHandler:
                return grpc.unary_unary_rpc_method_handler(method)

            continuation = innermost
            for interceptor in reversed(self._interceptors):
                continuation = (
                    lambda d, i=interceptor, c=continuation: i.intercept_service(c, d)
                )
            return continuation(details).unary_unary(request, context)

        return call
