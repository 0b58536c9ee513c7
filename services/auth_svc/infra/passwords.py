"""argon2id password hashing with the OWASP parameters (m=19 MiB, t=2, p=1), run on a
HashPool (infra/hashing.py): never on a gRPC worker thread, and refused at once when the
pool's waiting room is full."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from services.auth_svc.infra.hashing import HashPool, Reservation

__all__ = ["Argon2PasswordHasher"]


class Argon2PasswordHasher:
    """The PasswordHasher port: `reserve()` a place in the pool, then hash or verify."""

    def __init__(
        self,
        pool: HashPool,
        *,
        time_cost: int = 2,
        memory_cost: int = 19 * 1024,
        parallelism: int = 1,
    ) -> None:
        self._pool = pool
        self._hasher = Argon2Hasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            type=Type.ID,
        )

    @contextmanager
    def reserve(self) -> Iterator[_Slot]:
        with self._pool.reserve() as reservation:
            yield _Slot(self._hasher, reservation)

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True


class _Slot:
    """One request's hashes, each computed on the pool."""

    def __init__(self, hasher: Argon2Hasher, reservation: Reservation) -> None:
        self._hasher = hasher
        self._reservation = reservation

    def hash(self, password: str) -> str:
        return self._reservation.run(lambda: self._hasher.hash(password))

    def verify(self, password_hash: str, password: str) -> bool:
        return self._reservation.run(lambda: self._matches(password_hash, password))

    def _matches(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
