"""The real auth_svc process over a real channel, on both backends.

The tests of this module share one server per backend: the embedded default (SQLite,
in-process limiter) and PostgreSQL + Redis (skipped without them, failing with CI=true);
each makes its own accounts, and they pass alone and in any order. Every call to
AuthService goes through a recording client interceptor (or is counted by the grpcurl
helper), and every password and token the tests see is remembered, so the log test can
hold the server's whole log, whichever tests ran before it, to one access line per call
and no secret. The SIGTERM test stops a server of its own.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from services.auth_svc import SERVICE_NAME
from shared.config.clock import SystemClock
from shared.data.db import make_engine
from shared.security.jwk import from_jwk
from shared.security.tokens import StaticKeyProvider, TokenVerifier
from tests.helpers import ServiceProcess, error_detail, free_port

MAX_FAILURES = 5
PARALLEL_LOGINS = 20
ISSUER, AUDIENCE = "agentplatform-auth", "agentplatform"
TIMEOUT = 30.0  # per call, generous: a 2-core machine shared with other test runs
ACCESS_FIELDS = {"method", "code", "duration_ms", "peer", "request_id", "user_id"}


class _Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, calls: list[str], lock: threading.Lock) -> None:
        self._calls = calls
        self._lock = lock

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.startswith(f"/{SERVICE_NAME}/"):
            with self._lock:
                self._calls.append(method)
        return continuation(details, request)


@dataclass
class AuthServer:
    backend: str
    redis_url: str | None
    database_url: str
    process: ServiceProcess
    channel: grpc.Channel
    stub: auth_pb2_grpc.AuthServiceStub
    calls: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return self.process.address

    def remember(self, *values: str) -> None:
        with self.lock:
            self.secrets.update(v for v in values if v)

    def count_call(self, method: str) -> None:
        with self.lock:
            self.calls.append(f"/{SERVICE_NAME}/{method}")

    def new_account(self, password: str) -> str:
        """A registered, unique email (the password is remembered as a secret)."""
        email = f"user-{uuid.uuid4().hex[:12]}@example.com"
        self.remember(password)
        self.stub.Register(
            auth_pb2.RegisterRequest(email=email, password=password), timeout=TIMEOUT
        )
        return email

    def login(self, email: str, password: str) -> auth_pb2.LoginResponse:
        self.remember(password)
        reply: auth_pb2.LoginResponse = self.stub.Login(
            auth_pb2.LoginRequest(email=email, password=password), timeout=TIMEOUT
        )
        self.remember(reply.access_token, reply.refresh_token)
        return reply

    def refresh(self, refresh_token: str) -> auth_pb2.RefreshTokenResponse:
        reply: auth_pb2.RefreshTokenResponse = self.stub.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=refresh_token), timeout=TIMEOUT
        )
        self.remember(reply.access_token, reply.refresh_token)
        return reply


def _backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "embedded":
        return {}
    new_database: Callable[[], str] = request.getfixturevalue("new_postgres_database")
    return {
        "AUTH_DATABASE_URL": new_database(),
        "AUTH_REDIS_URL": str(request.getfixturevalue("redis_server_url")),
    }


@contextlib.contextmanager
def run_server(
    backend: str, backend_env: dict[str, str], data_dir: Path, **env: str
) -> Iterator[AuthServer]:
    """`python -m services.auth_svc` on that backend, with a recording channel to it."""
    port = free_port()
    process = ServiceProcess(
        "auth_svc",
        {
            "AUTH_PORT": str(port),
            "AUTH_METRICS_PORT": "0",
            "AUTH_DATA_DIR": str(data_dir),
            "AUTH_LOG_FORMAT": "json",
            "AUTH_LOG_LEVEL": "INFO",
            "AUTH_REFRESH_REUSE_GRACE_SECONDS": "0",
            "AUTH_LOGIN_MAX_FAILURES": str(MAX_FAILURES),
            # Room for every login of the parallel test to wait for a hashing thread: what
            # it counts is the failed-login limit, not the hashing capacity (HASHING_BUSY).
            "AUTH_HASH_QUEUE": str(PARALLEL_LOGINS),
            "AUTH_GRACE_SECONDS": "5",
            **backend_env,
            **env,
        },
        port,
        data_dir / "server.log",
    )
    channel: grpc.Channel | None = None
    try:
        process.wait_serving(SERVICE_NAME)
        lock = threading.Lock()
        calls: list[str] = []
        channel = grpc.intercept_channel(
            grpc.insecure_channel(process.address), _Recorder(calls, lock)
        )
        yield AuthServer(
            backend=backend,
            redis_url=backend_env.get("AUTH_REDIS_URL"),
            # The embedded default: auth.db in the data folder.
            database_url=backend_env.get("AUTH_DATABASE_URL", f"sqlite:///{data_dir}/auth.db"),
            process=process,
            channel=channel,
            stub=auth_pb2_grpc.AuthServiceStub(channel),
            calls=calls,
            lock=lock,
        )
    finally:
        if channel is not None:
            channel.close()
        process.stop()


BACKENDS = ["embedded", "postgres_redis"]


@pytest.fixture(scope="module", params=BACKENDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthServer]:
    """One server per backend, shared by the tests of this module: each test makes its own
    accounts and assumes nothing about what the others did."""
    data_dir = tmp_path_factory.mktemp(f"auth-{request.param}")
    with run_server(request.param, _backend_env(request), data_dir) as server:
        yield server


@pytest.fixture(params=BACKENDS)
def own_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuthServer]:
    """A server for this test alone (one that it stops), with its metrics served."""
    metrics_port = free_port()
    with run_server(
        request.param,
        _backend_env(request),
        tmp_path,
        AUTH_METRICS_PORT=str(metrics_port),
        AUTH_GRACE_SECONDS="30",  # the drain ends when the last call does
    ) as server:
        server.metrics_port = metrics_port
        yield server


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    return excinfo.value


def reason_of(error: grpc.RpcError) -> str:
    info = error_detail(rpc_status.from_call(error), error_details_pb2.ErrorInfo)
    return str(info.reason)


# -- health and reflection --------------------------------------------------------------


def test_health_reports_serving(server: AuthServer) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in (SERVICE_NAME, ""):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(server: AuthServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (reply,) = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


# -- the flow over generated stubs ------------------------------------------------------


def test_register_login_refresh_reuse_logout_change_password(server: AuthServer) -> None:
    stub = server.stub
    password, new_password = "first password 1", "second password 2"
    server.remember(password, new_password)
    local = f"Flow-{uuid.uuid4().hex[:8]}"
    user = stub.Register(
        auth_pb2.RegisterRequest(email=f"  {local}@Example.COM ", password=password),
        timeout=TIMEOUT,
    ).user
    email = f"{local.lower()}@example.com"
    assert user.email == email
    assert list(user.roles) == ["user"]

    login = server.login(email, password)
    assert login.token_type == "Bearer"
    assert login.expires_in == 900
    assert login.user == user

    me = stub.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(login.access_token), timeout=TIMEOUT
    )
    assert me.user == user

    # The access token verifies with the published keys, as another service would check it.
    jwks = stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=TIMEOUT)
    keys = [from_jwk({f.name: v for f, v in jwk.ListFields()}) for jwk in jwks.keys]
    verifier = TokenVerifier(
        StaticKeyProvider(keys), issuer=ISSUER, audience=AUDIENCE, clock=SystemClock()
    )
    assert verifier.verify(login.access_token).user_id == user.id

    refreshed = server.refresh(login.refresh_token)
    assert refreshed.refresh_token != login.refresh_token
    assert refreshed.token_type == "Bearer"

    reused = rpc_error(lambda: server.refresh(login.refresh_token))  # grace is 0 here
    assert reused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(reused) == "INVALID_REFRESH_TOKEN"
    dead = rpc_error(lambda: server.refresh(refreshed.refresh_token))  # the family died
    assert dead.code() == grpc.StatusCode.UNAUTHENTICATED

    session = server.login(email, password)
    for _ in range(2):  # idempotent
        stub.Logout(auth_pb2.LogoutRequest(refresh_token=session.refresh_token), timeout=TIMEOUT)
    assert rpc_error(lambda: server.refresh(session.refresh_token)).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )

    other_session = server.login(email, password)
    wrong = rpc_error(
        lambda: stub.ChangePassword(
            auth_pb2.ChangePasswordRequest(current_password="not it!!", new_password=new_password),
            metadata=bearer(session.access_token),
            timeout=TIMEOUT,
        )
    )
    assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED
    stub.ChangePassword(
        auth_pb2.ChangePasswordRequest(current_password=password, new_password=new_password),
        metadata=bearer(session.access_token),
        timeout=TIMEOUT,
    )
    assert rpc_error(lambda: server.refresh(other_session.refresh_token)).code() == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    old = rpc_error(lambda: server.login(email, password))
    assert old.code() == grpc.StatusCode.UNAUTHENTICATED
    assert server.login(email, new_password).user.id == user.id


def test_errors_carry_rich_details_over_the_wire(server: AuthServer) -> None:
    error = rpc_error(
        lambda: server.stub.Register(
            auth_pb2.RegisterRequest(email="not-an-email", password="short"), timeout=TIMEOUT
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    bad_request = error_detail(status, error_details_pb2.BadRequest)
    assert {v.field for v in bad_request.field_violations} == {"email", "password"}
    info = error_detail(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "auth.agentplatform")

    missing = rpc_error(
        lambda: server.stub.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), timeout=TIMEOUT)
    )
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(missing) == "MISSING_TOKEN"
    forged = rpc_error(
        lambda: server.stub.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer("e30.e30.AAAA"), timeout=TIMEOUT
        )
    )
    assert reason_of(forged) == "INVALID_TOKEN"


# -- parallel wrong passwords -----------------------------------------------------------


def test_parallel_wrong_passwords_never_get_more_tries_than_the_limit(server: AuthServer) -> None:
    password = "the right password"
    email = server.new_account(password)
    server.remember("a wrong password")
    start = threading.Barrier(PARALLEL_LOGINS)

    def wrong_login(_: int) -> grpc.RpcError:
        start.wait(timeout=TIMEOUT)
        return rpc_error(lambda: server.login(email, "a wrong password"))

    with ThreadPoolExecutor(max_workers=PARALLEL_LOGINS) as pool:
        errors = list(pool.map(wrong_login, range(PARALLEL_LOGINS)))
    codes = collections.Counter(e.code() for e in errors)
    assert codes[grpc.StatusCode.UNAUTHENTICATED] == MAX_FAILURES
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] == PARALLEL_LOGINS - MAX_FAILURES
    for error in errors:
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert reason_of(error) == "LOGIN_LOCKED"
            retry = error_detail(rpc_status.from_call(error), error_details_pb2.RetryInfo)
            assert 0 < retry.retry_delay.seconds <= 900

    locked = rpc_error(lambda: server.login(email, password))
    assert locked.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(locked) == "LOGIN_LOCKED"

    if server.redis_url is not None:  # counted in Redis (shared by replicas), not in-process
        client = redis.Redis.from_url(server.redis_url)
        try:
            key = "auth:login-attempts:" + hashlib.sha256(email.encode()).hexdigest()
            assert client.get(key) == str(MAX_FAILURES).encode()
            assert 0 < client.ttl(key) <= 900
        finally:
            client.close()


# -- grpcurl, through reflection --------------------------------------------------------


def grpcurl(
    binary: Path,
    server: AuthServer,
    method: str,
    data: dict[str, Any] | None = None,
    headers: Sequence[str] = (),
) -> tuple[int, Any]:
    args = [str(binary), "-plaintext", "-max-time", str(int(TIMEOUT))]
    for header in headers:
        args += ["-H", header]
    if data is not None:
        args += ["-d", json.dumps(data)]
    args += [server.address]
    if method == "list":
        args.append("list")
    else:
        args.append(f"{SERVICE_NAME}/{method}")
        server.count_call(method)
    done = subprocess.run(args, capture_output=True, text=True, timeout=2 * TIMEOUT, check=False)
    if done.returncode == 0 and method != "list":
        return 0, json.loads(done.stdout)
    return done.returncode, done.stdout + done.stderr


def test_an_operator_session_through_grpcurl(server: AuthServer, grpcurl_binary: Path) -> None:
    code, listing = grpcurl(grpcurl_binary, server, "list")
    assert code == 0
    assert SERVICE_NAME in listing.split()

    email = f"op-{uuid.uuid4().hex[:10]}@example.com"
    password = "operator password"
    server.remember(password)
    code, registered = grpcurl(
        grpcurl_binary, server, "Register", {"email": email, "password": password}
    )
    assert code == 0
    assert registered["user"]["email"] == email  # proto field names in 1.8.6

    code, login = grpcurl(grpcurl_binary, server, "Login", {"email": email, "password": password})
    assert code == 0
    server.remember(login["access_token"], login["refresh_token"])
    assert login["token_type"] == "Bearer"

    code, me = grpcurl(
        grpcurl_binary,
        server,
        "GetCurrentUser",
        headers=[f"authorization: Bearer {login['access_token']}"],
    )
    assert code == 0
    assert me["user"]["id"] == registered["user"]["id"]

    code, refreshed = grpcurl(
        grpcurl_binary, server, "RefreshToken", {"refresh_token": login["refresh_token"]}
    )
    assert code == 0
    server.remember(refreshed["access_token"], refreshed["refresh_token"])

    code, logout = grpcurl(
        grpcurl_binary, server, "Logout", {"refresh_token": refreshed["refresh_token"]}
    )
    assert (code, logout) == (0, {})

    code, output = grpcurl(
        grpcurl_binary, server, "Register", {"email": "bad", "password": password}
    )
    assert code == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "InvalidArgument" in output
    code, output = grpcurl(grpcurl_binary, server, "GetCurrentUser")
    assert code == 64 + grpc.StatusCode.UNAUTHENTICATED.value[0]


# -- the log, and shutdown --------------------------------------------------------------


def log_entries(server: AuthServer) -> list[dict[str, Any]]:
    """Every line of the log, each one a JSON object (AUTH_LOG_FORMAT=json)."""
    return [json.loads(line) for line in server.process.log().splitlines() if line.strip()]


def test_the_log_has_one_access_line_per_call_and_no_secret(server: AuthServer) -> None:
    # Calls of every kind this test makes itself, carrying every kind of secret (any
    # other test's calls on this server are held to the same rule below).
    password = "the log test's password"
    email = server.new_account(password)
    login = server.login(email, password)
    me = server.stub.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(login.access_token), timeout=TIMEOUT
    )
    refreshed = server.refresh(login.refresh_token)
    server.stub.Logout(
        auth_pb2.LogoutRequest(refresh_token=refreshed.refresh_token), timeout=TIMEOUT
    )
    server.remember("the log test's wrong password")
    wrong = rpc_error(lambda: server.login(email, "the log test's wrong password"))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    mine = {login.access_token, login.refresh_token, refreshed.access_token, password}

    deadline = time.monotonic() + 10
    while True:  # a line is written before its reply is sent; this only guards slow pipes
        entries = log_entries(server)
        access = [e for e in entries if e["logger"] == "agentplatform.access"]
        if len(access) >= len(server.calls) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert collections.Counter(e["method"] for e in access) == collections.Counter(server.calls)
    for entry in access:
        assert set(entry) >= ACCESS_FIELDS, entry
        assert entry["request_id"]
        assert entry["peer"].startswith(("ipv4:", "ipv6:"))
    assert any(
        e["user_id"] == me.user.id for e in access if e["method"].endswith("/GetCurrentUser")
    )
    assert any(e["logger"] == "agentplatform.audit" for e in entries)

    text = server.process.log()
    assert mine <= server.secrets
    leaked = [s for s in server.secrets if s in text]
    assert leaked == []


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the metrics endpoint, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def calls_started(server: AuthServer, method: str) -> float:
    labels = {"grpc_service": SERVICE_NAME, "grpc_method": method, "grpc_type": "unary"}
    key = ("grpc_server_started_total", frozenset(labels.items()))
    return scrape(server.metrics_port).get(key, 0.0)


@contextlib.contextmanager
def transactions_held_up(database_url: str) -> Iterator[None]:
    """While inside, every auth_svc transaction waits: SQLite's write lock (the service
    begins each transaction with BEGIN IMMEDIATE) or PostgreSQL's lock on the users table
    (a login reads it and a refresh family references it)."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("LOCK TABLE auth_users IN ACCESS EXCLUSIVE MODE"))
            else:
                connection.execute(text("SELECT 1"))  # the begin event took the write lock
            try:
                yield
            finally:
                connection.rollback()
    finally:
        engine.dispose()


def test_sigterm_drains_a_call_in_flight_and_exits_zero(own_server: AuthServer) -> None:
    server = own_server
    password = "drain password"
    email = server.new_account(password)
    with transactions_held_up(server.database_url):
        in_flight = server.stub.Login.future(
            auth_pb2.LoginRequest(email=email, password=password), timeout=60
        )
        # Accepted by the server, and it cannot finish while the database waits on us.
        deadline = time.monotonic() + 30
        while calls_started(server, "Login") < 1:
            assert time.monotonic() < deadline, "the login never reached the server"
            time.sleep(0.02)
        assert not in_flight.done()
        os.kill(server.process.process.pid, signal.SIGTERM)
        server.process.wait_logged("received SIGTERM")  # draining has begun
    reply = in_flight.result(timeout=60)  # accepted before SIGTERM: drained, not dropped
    server.remember(reply.access_token, reply.refresh_token)
    assert reply.user.email == email
    assert server.process.process.wait(timeout=60) == 0
    entries = log_entries(server)
    signalled = next(i for i, e in enumerate(entries) if "received SIGTERM" in e.get("msg", ""))
    [finished] = [
        i
        for i, e in enumerate(entries)
        if e["logger"] == "agentplatform.access" and e["method"].endswith("/Login")
    ]
    assert finished > signalled, "the login was not in flight at the signal"
    assert [s for s in server.secrets if s in server.process.log()] == []
