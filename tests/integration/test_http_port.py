"""The HTTP port of each service answers only what it serves: /metrics on both, the JWK Set
at /.well-known/jwks.json on auth (usable as a gateway's jwksUri), 404 for any other path,
405 for another method on a served path."""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc

from tests.integration.inprocess import Served, agent_service, auth_service, register_and_login

JWKS = "/.well-known/jwks.json"


@pytest.fixture
def auth(tmp_path: Path) -> Iterator[Served]:
    with auth_service(tmp_path) as served:
        yield served


def request(
    served: Served, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", served.metrics_port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, reply.headers, reply.read()
    finally:
        connection.close()


def test_the_jwks_document_holds_the_keys_of_get_jwks(auth: Served) -> None:
    status, headers, body = request(auth, "GET", JWKS)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "public, max-age=300"
    document = json.loads(body)
    with grpc.insecure_channel(auth.address) as channel:
        reply = auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
            auth_pb2.GetJwksRequest(), timeout=10
        )
    assert document == {
        "keys": [{field.name: value for field, value in key.ListFields()} for key in reply.keys]
    }
    assert all("d" not in key for key in document["keys"])  # public halves only


def test_a_token_verifies_with_the_keys_fetched_from_the_jwks_uri(auth: Served) -> None:
    """What a gateway does with a jwksUri: fetch the set, pick the key by kid, verify."""
    with grpc.insecure_channel(auth.address) as channel:
        token = register_and_login(channel, "jwks-uri@example.com").access_token
    keys = jwt.PyJWKClient(f"http://127.0.0.1:{auth.metrics_port}{JWKS}", cache_keys=False)
    key = keys.get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        key,
        algorithms=["EdDSA", "ES256"],
        audience=auth.app.settings.audience,
        issuer=auth.app.settings.issuer,
    )
    assert claims["sub"]


@pytest.mark.parametrize(
    "path", ["/", "/metrics/", "/.well-known/", "/.well-known/openid-configuration", "/x"]
)
def test_paths_it_does_not_serve_are_not_found(auth: Served, path: str) -> None:
    status, _, body = request(auth, "GET", path)
    assert (status, body) == (404, b"not found\n")
    assert request(auth, "HEAD", path)[0] == 404


def test_another_method_on_a_served_path_is_not_allowed(auth: Served) -> None:
    for path in ("/metrics", JWKS):
        status, headers, _ = request(auth, "POST", path)
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"
    assert request(auth, "DELETE", "/nowhere")[0] == 404


def test_metrics_are_served_with_a_query_in_the_format_asked_and_compressed(
    auth: Served,
) -> None:
    status, headers, body = request(auth, "GET", "/metrics?x=1")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"grpc_server_started_total" in body
    status, headers, body = request(
        auth,
        "GET",
        "/metrics",
        {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).rstrip().endswith(b"# EOF")


def test_head_answers_the_headers_without_a_body(auth: Served) -> None:
    status, headers, body = request(auth, "HEAD", JWKS)
    assert status == 200
    assert int(headers["Content-Length"]) > 0
    assert body == b""


def test_agent_serves_metrics_but_no_jwks(tmp_path: Path, auth: Served) -> None:
    with agent_service(tmp_path, {"AGENT_AUTH_TARGET": auth.address}) as agent:
        assert request(agent, "GET", "/metrics")[0] == 200
        assert request(agent, "GET", JWKS)[0] == 404
