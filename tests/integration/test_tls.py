"""TLS and mTLS on the servers, and on agent_svc's channel to auth_svc, with certificates
made by the test: a CA, a server certificate for localhost/127.0.0.1, client certificates
signed by the CA and by a stranger CA."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agentplatform.agent.v1 import agent_pb2, agent_pb2_grpc
from agentplatform.auth.v1 import auth_pb2, auth_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.auth_svc import SERVICE_NAME as AUTH_SERVICE_NAME
from tests.helpers import free_port
from tests.integration.inprocess import (
    Served,
    agent_service,
    auth_service,
    eventually,
    register_and_login,
)

# -- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path

    def credentials(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


class Authority:
    """A self-signed CA that issues leaf certificates into a folder."""

    def __init__(self, folder: Path, name: str) -> None:
        self._folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = folder / f"{name}-ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, name: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), server: bool
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self._folder / f"{name}.pem", self._folder / f"{name}-key.pem")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Issued
    renamed_server: Issued  # names only auth-svc.test: reached with a server-name override
    client: Issued
    stranger_client: Issued  # signed by a CA the servers do not trust


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "test")
    stranger = Authority(folder, "stranger")
    return Pki(
        ca=ca,
        server=ca.issue("server", dns=("localhost",), ips=("127.0.0.1",), server=True),
        renamed_server=ca.issue("renamed", dns=("auth-svc.test",), server=True),
        client=ca.issue("client", server=False),
        stranger_client=stranger.issue("stranger-client", server=False),
    )


def tls_env(pki: Pki, *, mtls: bool, server: Issued | None = None) -> dict[str, str]:
    server = server or pki.server
    env = {"AUTH_TLS_CERT_FILE": str(server.cert), "AUTH_TLS_KEY_FILE": str(server.key)}
    if mtls:
        env["AUTH_TLS_CLIENT_CA_FILE"] = str(pki.ca.ca_file)
    return env


def secure_channel(
    target: str, ca_file: Path, client: Issued | None = None, **options: str
) -> grpc.Channel:
    key, chain = client.credentials() if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(), private_key=key, certificate_chain=chain
    )
    return grpc.secure_channel(target, credentials, options=list(options.items()))


def jwks(channel: grpc.Channel) -> auth_pb2.GetJwksResponse:
    reply: auth_pb2.GetJwksResponse = auth_pb2_grpc.AuthServiceStub(channel).GetJwks(
        auth_pb2.GetJwksRequest(), timeout=5
    )
    return reply


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        jwks(channel)
    code: grpc.StatusCode = caught.value.code()
    return code


@pytest.fixture
def tls_auth(tmp_path: Path, pki: Pki) -> Iterator[Served]:
    health_port = free_port()
    env = {**tls_env(pki, mtls=False), "AUTH_HEALTH_PORT": str(health_port)}
    with auth_service(tmp_path, env) as served:
        yield served


@pytest.fixture
def mtls_auth(tmp_path: Path, pki: Pki) -> Iterator[Served]:
    with auth_service(tmp_path, tls_env(pki, mtls=True)) as served:
        yield served


# -- servers ------------------------------------------------------------------------------


def test_a_tls_server_answers_over_tls_only(tls_auth: Served, pki: Pki) -> None:
    port = tls_auth.running.port
    for host in ("localhost", "127.0.0.1"):  # both names of the certificate
        with secure_channel(f"{host}:{port}", pki.ca.ca_file) as channel:
            assert jwks(channel).keys
    with grpc.insecure_channel(f"127.0.0.1:{port}") as plaintext:
        assert refused(plaintext) == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA refuses the server's certificate.
    stranger_ca = pki.stranger_client.cert.parent / "stranger-ca.pem"
    with secure_channel(f"localhost:{port}", stranger_ca) as untrusting:
        assert refused(untrusting) == grpc.StatusCode.UNAVAILABLE


def test_the_plaintext_health_port_answers_while_the_main_port_is_tls(
    tls_auth: Served,
) -> None:
    health_port = int(tls_auth.env["AUTH_HEALTH_PORT"])
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving(service: str) -> None:
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING

        serving("")
        eventually(lambda: serving(AUTH_SERVICE_NAME))  # once the database answered
        # Health only: the API is not reachable in plaintext through this port.
        with pytest.raises(grpc.RpcError) as caught:
            jwks(channel)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_mtls_requires_a_client_certificate_from_the_configured_ca(
    mtls_auth: Served, pki: Pki
) -> None:
    target = f"localhost:{mtls_auth.running.port}"
    with secure_channel(target, pki.ca.ca_file) as anonymous:
        assert refused(anonymous) == grpc.StatusCode.UNAVAILABLE
    with secure_channel(target, pki.ca.ca_file, pki.stranger_client) as stranger:
        assert refused(stranger) == grpc.StatusCode.UNAVAILABLE
    with secure_channel(target, pki.ca.ca_file, pki.client) as known:
        assert jwks(known).keys


# -- agent_svc → auth_svc -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tls", "mtls", "tls-server-name"])
def test_agent_service_fetches_keys_over_tls(tmp_path: Path, pki: Pki, mode: str) -> None:
    """agent_svc verifies a token from auth_svc, so it fetched the JWKS over (m)TLS."""
    renamed = mode == "tls-server-name"
    auth_env = tls_env(pki, mtls=mode == "mtls", server=pki.renamed_server if renamed else None)
    with auth_service(tmp_path, auth_env) as auth:
        port = auth.running.port
        agent_env = {
            "AGENT_AUTH_TARGET": f"{'127.0.0.1' if renamed else 'localhost'}:{port}",
            "AGENT_AUTH_TLS_CA_FILE": str(pki.ca.ca_file),
        }
        if mode == "mtls":
            agent_env["AGENT_AUTH_TLS_CERT_FILE"] = str(pki.client.cert)
            agent_env["AGENT_AUTH_TLS_KEY_FILE"] = str(pki.client.key)
        if renamed:
            agent_env["AGENT_AUTH_TLS_SERVER_NAME"] = "auth-svc.test"
        name_override = {"grpc.ssl_target_name_override": "auth-svc.test"} if renamed else {}
        with secure_channel(
            f"127.0.0.1:{port}", pki.ca.ca_file, pki.client, **name_override
        ) as auth_channel:
            token = register_and_login(auth_channel, f"{mode}@example.com").access_token
        with (
            agent_service(tmp_path, agent_env) as agent,
            grpc.insecure_channel(agent.address) as channel,
        ):
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            reply = eventually(
                lambda: stub.ListAgents(agent_pb2.ListAgentsRequest(), metadata=metadata)
            )
            assert list(reply.agents) == []
            assert agent.metric("agentplatform_jwks_fetches_total", result="ok") == 1
            assert agent.metric("agentplatform_jwks_fetches_total", result="error") == 0


def test_agent_service_without_a_client_certificate_gets_no_keys_from_mtls_auth(
    tmp_path: Path, pki: Pki, mtls_auth: Served
) -> None:
    env = {
        "AGENT_AUTH_TARGET": f"localhost:{mtls_auth.running.port}",
        "AGENT_AUTH_TLS_CA_FILE": str(pki.ca.ca_file),
    }
    with agent_service(tmp_path, env) as agent:

        def failed() -> None:
            assert (agent.metric("agentplatform_jwks_fetches_total", result="error") or 0) >= 1

        eventually(failed)
        assert agent.metric("agentplatform_jwks_fetches_total", result="ok") == 0
