"""AuthService over gRPC (grpcio-testing), through the real request path, on fakes."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc_testing
import pytest
from agentplatform.auth.v1 import auth_pb2
from google.protobuf import message
from google.rpc import error_details_pb2, status_pb2

from services.auth_svc import PUBLIC_METHODS, SERVICE_NAME
from services.auth_svc.api.servicer import AuthServicer
from shared.rpc.metrics import RpcMetrics
from shared.rpc.request_path import RequestPath
from shared.security.tokens import StaticKeyProvider, TokenVerifier
from tests.helpers import Intercepted, error_detail, rich_status
from tests.unit.auth.fakes import AUDIENCE, ISSUER, AuthWorld, build_world

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
EMAIL = "grace@example.com"
PASSWORD = "correct horse battery"


@dataclass
class Reply:
    response: Any
    code: grpc.StatusCode
    details: str
    status: status_pb2.Status | None

    def reason(self) -> str:
        return str(error_detail(self.status, error_details_pb2.ErrorInfo).reason)


class Client:
    def __init__(self, world: AuthWorld) -> None:
        self.world = world
        verifier = TokenVerifier(
            StaticKeyProvider(world.keys.verification_keys),
            issuer=ISSUER,
            audience=AUDIENCE,
            clock=world.clock,
        )
        path = RequestPath(
            domain="auth.agentplatform",
            verifier=verifier,
            public_methods=PUBLIC_METHODS,
            metrics=RpcMetrics(),
        )
        self._server = grpc_testing.server_from_dictionary(
            {SERVICE: Intercepted(AuthServicer(world.service), SERVICE_NAME, path)},
            grpc_testing.strict_real_time(),
        )

    def call(self, method: str, request: message.Message, *, token: str | None = None) -> Reply:
        metadata: Sequence[tuple[str, str]] = (
            (("authorization", f"Bearer {token}"),) if token is not None else ()
        )
        rpc = self._server.invoke_unary_unary(
            SERVICE.methods_by_name[method], metadata, request, None
        )
        response, trailing, code, details = rpc.termination()
        return Reply(response, code, details, rich_status(trailing))

    def ok(self, method: str, request: message.Message, *, token: str | None = None) -> Any:
        reply = self.call(method, request, token=token)
        assert reply.code == grpc.StatusCode.OK, reply.details
        return reply.response

    def register(self, email: str = EMAIL, password: str = PASSWORD) -> auth_pb2.RegisterResponse:
        reply: auth_pb2.RegisterResponse = self.ok(
            "Register", auth_pb2.RegisterRequest(email=email, password=password)
        )
        return reply

    def login(self, email: str = EMAIL, password: str = PASSWORD) -> auth_pb2.LoginResponse:
        reply: auth_pb2.LoginResponse = self.ok(
            "Login", auth_pb2.LoginRequest(email=email, password=password)
        )
        return reply


@pytest.fixture
def client() -> Client:
    return Client(build_world(max_failures=3, grace_seconds=5))


def test_register_returns_the_new_user(client: Client) -> None:
    user = client.ok(
        "Register",
        auth_pb2.RegisterRequest(email=" Grace@Example.com ", password=PASSWORD, display_name="G"),
    ).user
    assert uuid.UUID(user.id)
    assert user.email == EMAIL
    assert user.display_name == "G"
    assert list(user.roles) == ["user"]
    assert not user.disabled
    assert user.create_time.ToDatetime(tzinfo=client.world.clock.now().tzinfo) == (
        client.world.clock.now()
    )
    assert user.update_time == user.create_time


def test_register_with_bad_fields_is_invalid_argument_with_violations(client: Client) -> None:
    reply = client.call("Register", auth_pb2.RegisterRequest(email="nope", password="short"))
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = error_detail(reply.status, error_details_pb2.BadRequest)
    assert {v.field for v in bad_request.field_violations} == {"email", "password"}
    assert reply.reason() == "INVALID_ARGUMENT"


def test_register_twice_is_already_exists(client: Client) -> None:
    client.register()
    reply = client.call("Register", auth_pb2.RegisterRequest(email=EMAIL, password=PASSWORD))
    assert reply.code == grpc.StatusCode.ALREADY_EXISTS
    assert reply.reason() == "EMAIL_TAKEN"


def test_login_returns_a_bearer_pair_and_the_user(client: Client) -> None:
    registered = client.register().user
    reply = client.login()
    assert reply.token_type == "Bearer"
    assert reply.expires_in == 900
    assert reply.access_token.count(".") == 2
    assert reply.refresh_token
    assert reply.user == registered


def test_login_with_a_wrong_password_is_unauthenticated(client: Client) -> None:
    client.register()
    reply = client.call("Login", auth_pb2.LoginRequest(email=EMAIL, password="wrong password"))
    assert reply.code == grpc.StatusCode.UNAUTHENTICATED
    assert reply.reason() == "INVALID_CREDENTIALS"


def test_login_when_locked_is_resource_exhausted_with_retry_info(client: Client) -> None:
    request = auth_pb2.LoginRequest(email="nobody@example.com", password="wrong password")
    codes = [client.call("Login", request).code for _ in range(3)]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    reply = client.call("Login", request)
    assert reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reply.reason() == "LOGIN_LOCKED"
    retry = error_detail(reply.status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 60


def test_login_without_fields_is_invalid_argument(client: Client) -> None:
    reply = client.call("Login", auth_pb2.LoginRequest())
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT


def test_login_with_an_email_no_account_can_have_is_invalid_argument(client: Client) -> None:
    for email in ("a" * 250 + "@example.com", "grace\x00@example.com"):
        reply = client.call("Login", auth_pb2.LoginRequest(email=email, password=PASSWORD))
        assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
        bad_request = error_detail(reply.status, error_details_pb2.BadRequest)
        assert [v.field for v in bad_request.field_violations] == ["email"]


def test_login_while_hashing_is_busy_is_resource_exhausted_with_retry_info(
    client: Client,
) -> None:
    client.register()
    client.world.hasher.busy = True
    reply = client.call("Login", auth_pb2.LoginRequest(email=EMAIL, password=PASSWORD))
    assert reply.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reply.reason() == "HASHING_BUSY"
    retry = error_detail(reply.status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds >= 1


def test_a_refresh_token_never_issued_is_unauthenticated(client: Client) -> None:
    for token in ("x" * 129, "not a token!"):
        reply = client.call("RefreshToken", auth_pb2.RefreshTokenRequest(refresh_token=token))
        assert reply.code == grpc.StatusCode.UNAUTHENTICATED
        assert reply.reason() == "INVALID_REFRESH_TOKEN"


def test_refresh_token_returns_a_new_pair(client: Client) -> None:
    client.register()
    first = client.login()
    reply = client.ok(
        "RefreshToken", auth_pb2.RefreshTokenRequest(refresh_token=first.refresh_token)
    )
    assert reply.token_type == "Bearer"
    assert reply.expires_in == 900
    assert reply.access_token
    assert reply.refresh_token not in ("", first.refresh_token)


def test_refresh_token_reused_after_grace_is_unauthenticated(client: Client) -> None:
    client.register()
    first = client.login().refresh_token
    child = client.ok("RefreshToken", auth_pb2.RefreshTokenRequest(refresh_token=first))
    client.world.clock.advance(10)
    for token in (first, child.refresh_token):
        reply = client.call("RefreshToken", auth_pb2.RefreshTokenRequest(refresh_token=token))
        assert reply.code == grpc.StatusCode.UNAUTHENTICATED
        assert reply.reason() == "INVALID_REFRESH_TOKEN"


def test_refresh_token_without_a_token_is_invalid_argument(client: Client) -> None:
    reply = client.call("RefreshToken", auth_pb2.RefreshTokenRequest())
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT


def test_logout_revokes_and_is_idempotent(client: Client) -> None:
    client.register()
    refresh = client.login().refresh_token
    for _ in range(2):
        assert client.ok("Logout", auth_pb2.LogoutRequest(refresh_token=refresh)) == (
            auth_pb2.LogoutResponse()
        )
    reply = client.call("RefreshToken", auth_pb2.RefreshTokenRequest(refresh_token=refresh))
    assert reply.code == grpc.StatusCode.UNAUTHENTICATED
    assert client.ok("Logout", auth_pb2.LogoutRequest(refresh_token="unknown"))


def test_logout_without_a_token_is_invalid_argument(client: Client) -> None:
    assert client.call("Logout", auth_pb2.LogoutRequest()).code == grpc.StatusCode.INVALID_ARGUMENT


def test_get_jwks_lists_the_public_key_by_rfc_7517_names(client: Client) -> None:
    (jwk,) = client.ok("GetJwks", auth_pb2.GetJwksRequest()).keys
    (key,) = client.world.keys.verification_keys
    assert (jwk.kid, jwk.kty, jwk.alg, jwk.use, jwk.crv) == (
        key.kid,
        "OKP",
        "EdDSA",
        "sig",
        "Ed25519",
    )
    assert jwk.x
    assert (jwk.y, jwk.n, jwk.e) == ("", "", "")


def test_get_current_user_without_a_token_is_unauthenticated(client: Client) -> None:
    reply = client.call("GetCurrentUser", auth_pb2.GetCurrentUserRequest())
    assert reply.code == grpc.StatusCode.UNAUTHENTICATED
    assert reply.reason() == "MISSING_TOKEN"


def test_get_current_user_with_a_bad_token_is_unauthenticated(client: Client) -> None:
    reply = client.call("GetCurrentUser", auth_pb2.GetCurrentUserRequest(), token="a.b.c")
    assert reply.code == grpc.StatusCode.UNAUTHENTICATED
    assert reply.reason() == "INVALID_TOKEN"


def test_get_current_user_with_a_token_returns_the_caller(client: Client) -> None:
    registered = client.register().user
    token = client.login().access_token
    reply = client.ok("GetCurrentUser", auth_pb2.GetCurrentUserRequest(), token=token)
    assert reply.user == registered


def test_get_current_user_with_an_expired_token_is_unauthenticated(client: Client) -> None:
    client.register()
    token = client.login().access_token
    client.world.clock.advance(900 + 31)
    reply = client.call("GetCurrentUser", auth_pb2.GetCurrentUserRequest(), token=token)
    assert reply.code == grpc.StatusCode.UNAUTHENTICATED


def test_change_password_needs_a_token(client: Client) -> None:
    reply = client.call(
        "ChangePassword",
        auth_pb2.ChangePasswordRequest(current_password=PASSWORD, new_password="another one!"),
    )
    assert reply.code == grpc.StatusCode.UNAUTHENTICATED


def test_change_password_with_a_wrong_current_password_is_permission_denied(
    client: Client,
) -> None:
    client.register()
    token = client.login().access_token
    reply = client.call(
        "ChangePassword",
        auth_pb2.ChangePasswordRequest(
            current_password="not it at all", new_password="another one!"
        ),
        token=token,
    )
    assert reply.code == grpc.StatusCode.PERMISSION_DENIED
    assert reply.reason() == "WRONG_PASSWORD"


def test_change_password_with_a_short_new_password_is_invalid_argument(client: Client) -> None:
    client.register()
    token = client.login().access_token
    reply = client.call(
        "ChangePassword",
        auth_pb2.ChangePasswordRequest(current_password=PASSWORD, new_password="short"),
        token=token,
    )
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = error_detail(reply.status, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == ["new_password"]


def test_change_password_succeeds_and_ends_every_session(client: Client) -> None:
    client.register()
    session = client.login()
    reply = client.ok(
        "ChangePassword",
        auth_pb2.ChangePasswordRequest(current_password=PASSWORD, new_password="another one!"),
        token=session.access_token,
    )
    assert reply == auth_pb2.ChangePasswordResponse()
    dead = client.call(
        "RefreshToken", auth_pb2.RefreshTokenRequest(refresh_token=session.refresh_token)
    )
    assert dead.code == grpc.StatusCode.UNAUTHENTICATED
    assert client.login(password="another one!")


def test_public_methods_ignore_a_bad_token(client: Client) -> None:
    client.register()
    reply = client.call(
        "Login", auth_pb2.LoginRequest(email=EMAIL, password=PASSWORD), token="junk"
    )
    assert reply.code == grpc.StatusCode.OK


def test_exactly_the_documented_methods_are_public() -> None:
    assert {
        *(
            f"/agentplatform.auth.v1.AuthService/{name}"
            for name in ("Register", "Login", "RefreshToken", "Logout", "GetJwks")
        ),
        "/agentplatform.auth.v1.TokenService/IssueToken",
    } == PUBLIC_METHODS
    public = {m.rsplit("/", 1)[1] for m in PUBLIC_METHODS}
    assert set(SERVICE.methods_by_name) - public == {"GetCurrentUser", "ChangePassword"}
    # Every ServiceAccountService method needs a token (an administrator's).
    accounts = auth_pb2.DESCRIPTOR.services_by_name["ServiceAccountService"]
    assert not {f"/{accounts.full_name}/{m}" for m in accounts.methods_by_name} & PUBLIC_METHODS
