"""The argon2id hasher itself (the only tests that pay for real hashing), on a real pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from argon2 import PasswordHasher as Argon2Hasher

from services.auth_svc.infra.hashing import HashPool
from services.auth_svc.infra.passwords import Argon2PasswordHasher
from shared.rpc.errors import ResourceExhausted

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def pool() -> Iterator[HashPool]:
    pool = HashPool(concurrency=2, queue=8)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def hasher(pool: HashPool) -> Argon2PasswordHasher:
    return Argon2PasswordHasher(pool)


@pytest.fixture(scope="module")
def stored(hasher: Argon2PasswordHasher) -> str:
    with hasher.reserve() as slot:
        return slot.hash(PASSWORD)


def verifies(hasher: Argon2PasswordHasher, stored: str, password: str) -> bool:
    with hasher.reserve() as slot:
        return slot.verify(stored, password)


def test_hashes_are_argon2id_with_the_owasp_parameters(stored: str) -> None:
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PASSWORD not in stored


def test_the_right_password_verifies(hasher: Argon2PasswordHasher, stored: str) -> None:
    assert verifies(hasher, stored, PASSWORD)


@pytest.mark.parametrize("password", ["", "correct horse battery stapl", PASSWORD + " "])
def test_other_passwords_do_not(hasher: Argon2PasswordHasher, stored: str, password: str) -> None:
    assert not verifies(hasher, stored, password)


@pytest.mark.parametrize("garbage", ["", "not a hash", "$argon2id$v=19$m=19456,t=2,p=1$AAAA$BBBB"])
def test_a_malformed_hash_never_verifies(hasher: Argon2PasswordHasher, garbage: str) -> None:
    assert not verifies(hasher, garbage, PASSWORD)


def test_long_passwords_are_not_truncated(hasher: Argon2PasswordHasher) -> None:
    long = "é" * 128  # 256 bytes: well past bcrypt's 72
    with hasher.reserve() as slot:
        stored = slot.hash(long)
        assert slot.verify(stored, long)
        assert not slot.verify(stored, long[:-1] + "e")


def test_weaker_hashes_need_a_rehash(hasher: Argon2PasswordHasher, stored: str) -> None:
    weak = Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    assert hasher.needs_rehash(weak)
    assert hasher.needs_rehash("not a hash")
    assert not hasher.needs_rehash(stored)


def test_hashing_runs_on_the_pools_threads(hasher: Argon2PasswordHasher) -> None:
    seen: list[str] = []
    original = Argon2Hasher.hash

    def spy(self: Argon2Hasher, password: str | bytes, **kwargs: object) -> str:
        seen.append(threading.current_thread().name)
        return original(self, password)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Argon2Hasher, "hash", spy)
        with hasher.reserve() as slot:
            slot.hash(PASSWORD)
    assert len(seen) == 1
    assert seen[0].startswith("password-hash-")
    assert seen[0] != threading.current_thread().name


def test_a_full_pool_refuses_a_reservation_at_once() -> None:
    pool = HashPool(concurrency=1, queue=0)
    hasher = Argon2PasswordHasher(pool, memory_cost=8, time_cost=1)
    try:
        with hasher.reserve():  # another request holds the only place
            with pytest.raises(ResourceExhausted) as excinfo, hasher.reserve():
                pass  # pragma: no cover
            assert excinfo.value.reason == "HASHING_BUSY"
        with hasher.reserve() as slot:
            assert slot.verify(slot.hash(PASSWORD), PASSWORD)
    finally:
        pool.close()
