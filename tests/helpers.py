"""Test helpers: what a test does when a prerequisite is missing, free ports, service
processes, in-process interceptor chains."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.rpc.request_path import RequestPath

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
# How long a service process may take to start: imports, migrations and keys take seconds
# alone, and a machine shared with other test runs has taken over 30 s.
STARTUP_DEADLINE = 120.0


def unavailable(message: str) -> NoReturn:
    """A prerequisite (a server, a tool, a package) is not there: skip on a laptop, fail in
    CI, where everything the suite needs must exist. Every skip of the suite goes through
    here; a bare `pytest.skip` or `skipif` would let CI pass without running the test."""
    if IN_CI:
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)
    pytest.skip(f"{message} (CI=true makes this a failure)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """A service started as `python -m services.<name> [args]` with the given environment."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        port: int,
        log_path: Path,
        args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.port = port
        self.address = f"127.0.0.1:{port}"
        # agent_svc's WatchAgents port, when the environment names one.
        self.watch_address = f"127.0.0.1:{env.get('AGENT_WATCH_PORT') or 0}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}", *args],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_serving(self, service: str, timeout: float = STARTUP_DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} not SERVING after {timeout}s:\n{self.log()}")

    def wait_logged(self, text: str, timeout: float = STARTUP_DEADLINE) -> None:
        """Until the process has logged a line containing `text` (an event it announces)."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} never logged {text!r}:\n{self.log()}")
            time.sleep(0.02)

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


class Intercepted:
    """A servicer seen through the request path, for grpcio-testing (which has none).

    Each method is wrapped exactly as the real server's registration wraps it: the wrapper
    gets the request's bytes, and its bytes are parsed back into the response message."""

    def __init__(self, servicer: Any, service: str, path: RequestPath) -> None:
        self._servicer = servicer
        self._service = descriptor_pool.Default().FindServiceByName(service)
        self._path = path

    def __getattr__(self, name: str) -> Any:
        method = self._service.methods_by_name[name]
        handler = self._path.wrap(
            f"/{self._service.full_name}/{name}",
            grpc.unary_unary_rpc_method_handler(
                getattr(self._servicer, name),
                request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
                response_serializer=lambda response: response.SerializeToString(),
            ),
        )
        response_type = message_factory.GetMessageClass(method.output_type)

        def call(request: Any, context: Any) -> Any:
            try:
                data = handler.unary_unary(request.SerializeToString(), _TestingContext(context))
            except _Aborted:
                return None  # code, details and trailing metadata are set on the context
            return response_type.FromString(data)

        return call


class _Aborted(Exception):
    """Raised by `_TestingContext.abort`, as the real server's `abort` raises."""


class _TestingContext:
    """grpcio-testing's servicer context made to behave like the real server's where our
    interceptors depend on it: `code()` and `peer()` answer (the access log and metrics
    read them), and `abort()` keeps the trailing metadata set before it (grpcio-testing's
    drops it, and with it the `grpc-status-details-bin` rich error details)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def time_remaining(self) -> float | None:
        remaining = self._context.time_remaining()
        return None if remaining is None else float(remaining)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def peer(self) -> str:
        return "grpc-testing"  # grpcio-testing raises NotImplementedError

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.set_code(code)
        self._context.set_details(details)
        raise _Aborted(details)

    def abort_with_status(self, status: grpc.Status) -> None:
        self._context.set_trailing_metadata(status.trailing_metadata)
        self.abort(status.code, status.details)


class FakeClock:
    """A `shared.config.clock.Clock` that moves only when told to: `advance(seconds)`."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)
        self._monotonic = 1000.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._monotonic += seconds


def rich_status(trailing_metadata: Iterable[tuple[str, Any]] | None) -> status_pb2.Status | None:
    """The google.rpc.Status in an error's trailing metadata (`grpc-status-details-bin`)."""
    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


def error_detail(status: status_pb2.Status | None, kind: type[Any]) -> Any:
    """The first detail of that message type (ErrorInfo, BadRequest, RetryInfo…) or None."""
    for packed in status.details if status is not None else ():
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            return detail
    return None
