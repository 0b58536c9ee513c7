"""The argon2id hasher itself (the only tests that pay for real hashing)."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher as Argon2Hasher

from services.auth_svc.infra.passwords import Argon2PasswordHasher
from shared.rpc.errors import Unavailable

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hasher() -> Argon2PasswordHasher:
    return Argon2PasswordHasher()


@pytest.fixture(scope="module")
def stored(hasher: Argon2PasswordHasher) -> str:
    return hasher.hash(PASSWORD)


def test_hashes_are_argon2id_with_the_owasp_parameters(stored: str) -> None:
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert PASSWORD not in stored


def test_the_right_password_verifies(hasher: Argon2PasswordHasher, stored: str) -> None:
    assert hasher.verify(stored, PASSWORD)


@pytest.mark.parametrize("password", ["", "correct horse battery stapl", PASSWORD + " "])
def test_other_passwords_do_not(hasher: Argon2PasswordHasher, stored: str, password: str) -> None:
    assert not hasher.verify(stored, password)


@pytest.mark.parametrize("garbage", ["", "not a hash", "$argon2id$v=19$m=19456,t=2,p=1$AAAA$BBBB"])
def test_a_malformed_hash_never_verifies(hasher: Argon2PasswordHasher, garbage: str) -> None:
    assert not hasher.verify(garbage, PASSWORD)


def test_long_passwords_are_not_truncated(hasher: Argon2PasswordHasher) -> None:
    long = "é" * 128  # 256 bytes: well past bcrypt's 72
    stored = hasher.hash(long)
    assert hasher.verify(stored, long)
    assert not hasher.verify(stored, long[:-1] + "e")


def test_weaker_hashes_need_a_rehash(hasher: Argon2PasswordHasher, stored: str) -> None:
    weak = Argon2Hasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    assert hasher.needs_rehash(weak)
    assert hasher.needs_rehash("not a hash")
    assert not hasher.needs_rehash(stored)


def test_hashing_beyond_the_concurrency_cap_is_unavailable() -> None:
    hasher = Argon2PasswordHasher(concurrency=1, wait_seconds=0.01, memory_cost=8, time_cost=1)
    slot = hasher._slot()  # another call holds the only slot
    try:
        with pytest.raises(Unavailable) as excinfo:
            hasher.hash(PASSWORD)
        assert excinfo.value.reason == "HASHING_BUSY"
    finally:
        slot.release()
    assert hasher.verify(hasher.hash(PASSWORD), PASSWORD)
