"""Private Redis topologies for the HA tests, made of `redis-server` processes on free ports.

- `SentinelSetup`: a master, a replica and three sentinels (quorum 2) watching it, with a
  1 s down-after, so a killed master is replaced within a few seconds.
- `ClusterSetup`: a Redis Cluster of three masters, each with a replica (`redis-cli
  --cluster create`), node timeout 1 s.
- Either can run over TLS (`tls=TlsFiles`: a throwaway CA, a server and a client
  certificate made with the `cryptography` package) with an ACL user and password.

Ports come from `HA_TEST_PORTS` (`first-last`, default 17300-17499), checked free before
use (a cluster node also needs its bus port, +10000). Every process is killed at `close()`.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.config.settings import RedisConfig
from tests.faults.servers import RedisServer

__all__ = ["ClusterSetup", "SentinelSetup", "TlsFiles", "make_tls_files", "redis_node"]

START_TIMEOUT = 60.0
MASTER_NAME = "ha-master"
ACL_USER = "agentplatform"
ACL_PASSWORD = "ha-test-password"

_port_lock = threading.Lock()
_next_port = 0


def _port_range() -> tuple[int, int]:
    first, _, last = os.environ.get("HA_TEST_PORTS", "17300-17499").partition("-")
    return int(first), int(last)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def take_port(*, bus: bool = False) -> int:
    """A free port of the range (and its cluster bus port, +10000, with `bus`)."""
    global _next_port  # noqa: PLW0603 - one allocator per test process
    first, last = _port_range()
    with _port_lock:
        for _ in range(last - first + 1):
            port = first + (_next_port % (last - first + 1))
            _next_port += 1
            if _free(port) and (not bus or _free(port + 10000)):
                return port
    raise RuntimeError(f"no free port in {first}-{last} (HA_TEST_PORTS)")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A throwaway CA, and a server (127.0.0.1) and client certificate signed by it."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ha-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, usages: list[x509.ObjectIdentifier]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        )
        cert = builder.sign(ca_key, hashes.SHA256())
        return (
            cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    files = TlsFiles(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    # Servers are clients of each other too (replication, the cluster bus, sentinels).
    cert, key = leaf(
        "redis-server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    files.server_cert.write_bytes(cert)
    files.server_key.write_bytes(key)
    cert, key = leaf("agentplatform", [ExtendedKeyUsageOID.CLIENT_AUTH])
    files.client_cert.write_bytes(cert)
    files.client_key.write_bytes(key)
    return files


def redis_node(
    folder: Path, port: int, lines: list[str], *, tls: TlsFiles | None = None
) -> RedisServer:
    """A `redis-server` (a data node or a sentinel) of a topology, over TLS with the ACL
    user when `tls` is given."""
    listen = (
        [
            "port 0",
            f"tls-port {port}",
            f"tls-cert-file {tls.server_cert}",
            f"tls-key-file {tls.server_key}",
            f"tls-ca-cert-file {tls.ca}",
            "tls-auth-clients yes",
            "tls-replication yes",
            "tls-cluster yes",
        ]
        if tls
        else []
    )
    acl = (
        [
            f"masteruser {ACL_USER}",
            f"masterauth {ACL_PASSWORD}",
            f"user {ACL_USER} on >{ACL_PASSWORD} ~* &* +@all",
            "user default off",
        ]
        if tls
        else []
    )
    return RedisServer(
        folder, port, [*listen, *lines, *acl], client_options=tls_client_options(tls)
    )


def tls_client_options(tls: TlsFiles | None) -> dict[str, Any]:
    """The redis-py options of a client of a node made with `tls` (none without)."""
    options: dict[str, Any] = {}
    if tls:
        options |= {
            "ssl": True,
            "ssl_ca_certs": str(tls.ca),
            "ssl_certfile": str(tls.client_cert),
            "ssl_keyfile": str(tls.client_key),
            "username": ACL_USER,
            "password": ACL_PASSWORD,
        }
    return options


def _which(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise FileNotFoundError(program)
    return path


class _Setup:
    def __init__(self, tls: TlsFiles | None) -> None:
        self.tls = tls
        self.processes: list[RedisServer] = []

    @property
    def scheme(self) -> str:
        return "rediss" if self.tls else "redis"

    def config_env(self, prefix: str) -> dict[str, str]:
        """The service variables (`<prefix>_REDIS_…`) that point at this topology."""
        config = self.config()
        env = {f"{prefix}_REDIS_URL": config.url, f"{prefix}_REDIS_MODE": config.mode}
        if config.sentinel_master:
            env[f"{prefix}_REDIS_SENTINEL_MASTER"] = config.sentinel_master
        for key, value in (
            ("REDIS_USERNAME", config.username),
            ("REDIS_PASSWORD", config.password),
            ("REDIS_SENTINEL_USERNAME", config.sentinel_username),
            ("REDIS_SENTINEL_PASSWORD", config.sentinel_password),
            ("REDIS_TLS_CA_FILE", config.tls_ca_file),
            ("REDIS_TLS_CERT_FILE", config.tls_cert_file),
            ("REDIS_TLS_KEY_FILE", config.tls_key_file),
        ):
            if value:
                env[f"{prefix}_{key}"] = value
        return env

    def _credentials(self) -> dict[str, Any]:
        if not self.tls:
            return {}
        return {
            "username": ACL_USER,
            "password": ACL_PASSWORD,
            "tls_ca_file": str(self.tls.ca),
            "tls_cert_file": str(self.tls.client_cert),
            "tls_key_file": str(self.tls.client_key),
        }

    def config(self) -> RedisConfig:
        raise NotImplementedError

    def close(self) -> None:
        for process in self.processes:
            with contextlib.suppress(Exception):
                process.kill()


class SentinelSetup(_Setup):
    def __init__(self, root: Path, *, tls: TlsFiles | None = None) -> None:
        super().__init__(tls)
        self.master = redis_node(root / "master", take_port(), [], tls=tls)
        self.replica = redis_node(
            root / "replica",
            take_port(),
            [f"replicaof 127.0.0.1 {self.master.port}"],
            tls=tls,
        )
        self.sentinels = []
        for i in range(3):
            lines = [
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                f"sentinel failover-timeout {MASTER_NAME} 10000",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ]
            if tls:
                lines += [
                    f"sentinel auth-user {MASTER_NAME} {ACL_USER}",
                    f"sentinel auth-pass {MASTER_NAME} {ACL_PASSWORD}",
                    f"sentinel sentinel-user {ACL_USER}",
                    f"sentinel sentinel-pass {ACL_PASSWORD}",
                ]
            self.sentinels.append(redis_node(root / f"sentinel{i}", take_port(), lines, tls=tls))
        self.processes = [self.master, self.replica, *self.sentinels]

    def start(self) -> None:
        for process in (self.master, self.replica):
            process.start()
        self.wait_replicated(self.master, self.replica)
        for sentinel in self.sentinels:
            sentinel.launch()
        for sentinel in self.sentinels:
            sentinel.wait_ready()
        self.wait_for_sentinels()

    def wait_replicated(self, master: RedisServer, replica: RedisServer) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        client = replica.client()
        try:
            while client.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the replica does not sync:\n{replica.log()[-3000:]}")
                time.sleep(0.05)
        finally:
            client.close()

    def wait_for_sentinels(self) -> None:
        """Every sentinel knows the replica and the two other sentinels."""
        deadline = time.monotonic() + START_TIMEOUT
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                while True:
                    fields: Any = client.sentinel_master(MASTER_NAME)
                    if int(fields["num-other-sentinels"]) == 2 and int(fields["num-slaves"]) >= 1:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"sentinels do not agree: {fields}")
                    time.sleep(0.1)
            finally:
                client.close()

    def master_port(self) -> int:
        """The master's port as the sentinels report it now."""
        client = self.sentinels[0].client()
        try:
            address: Any = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            return int(address[1])
        finally:
            client.close()

    def node(self, port: int) -> RedisServer:
        return next(p for p in (self.master, self.replica) if p.port == port)

    def config(self) -> RedisConfig:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        credentials = self._credentials()
        if self.tls:
            credentials |= {"sentinel_username": ACL_USER, "sentinel_password": ACL_PASSWORD}
        return RedisConfig(
            mode="sentinel",
            url=f"{self.scheme}://{hosts}/0",
            sentinel_master=MASTER_NAME,
            **credentials,
        )


class ClusterSetup(_Setup):
    def __init__(self, root: Path, *, tls: TlsFiles | None = None, masters: int = 3) -> None:
        super().__init__(tls)
        self.processes = []
        for i in range(masters * 2):
            port = take_port(bus=True)
            self.processes.append(
                redis_node(
                    root / f"node{i}",
                    port,
                    [
                        "cluster-enabled yes",
                        "cluster-config-file nodes.conf",
                        "cluster-node-timeout 1000",
                        # A replica whose master died takes over however long ago it synced.
                        "cluster-replica-validity-factor 0",
                    ],
                    tls=tls,
                )
            )

    def start(self) -> None:
        for process in self.processes:
            process.launch()
        for process in self.processes:
            process.wait_ready()
        command = [
            _which("redis-cli"),
            *self._cli_tls(),
            "--cluster",
            "create",
            *(f"127.0.0.1:{p.port}" for p in self.processes),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        self.wait_healthy()

    def _cli_tls(self) -> list[str]:
        if not self.tls:
            return []
        return [
            "--tls",
            "--cacert",
            str(self.tls.ca),
            "--cert",
            str(self.tls.client_cert),
            "--key",
            str(self.tls.client_key),
            "--user",
            ACL_USER,
            "--pass",
            ACL_PASSWORD,
        ]

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Every running node says `cluster_state:ok` and sees every slot served."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            if not process.running:
                continue
            client = process.client()
            try:
                while True:
                    info: Any = client.cluster("INFO")
                    if info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16384:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the cluster is not healthy: {info}")
                    time.sleep(0.1)
            finally:
                client.close()

    def masters(self) -> list[RedisServer]:
        found = []
        for process in self.processes:
            if not process.running:
                continue
            client = process.client()
            try:
                if client.info("replication").get("role") == "master":
                    found.append(process)
            finally:
                client.close()
        return found

    def config(self) -> RedisConfig:
        hosts = ",".join(f"127.0.0.1:{p.port}" for p in self.processes[:3])
        return RedisConfig(mode="cluster", url=f"{self.scheme}://{hosts}", **self._credentials())
