"""argon2id password hashing with the OWASP parameters (m=19 MiB, t=2, p=1)."""

from __future__ import annotations

import threading

from argon2 import PasswordHasher as Argon2Hasher
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from shared.rpc.errors import Unavailable

__all__ = ["Argon2PasswordHasher"]


class Argon2PasswordHasher:
    """argon2-cffi releases the GIL while hashing, so a hash occupies only its own worker
    thread; a semaphore caps concurrent hashes (CPU and 19 MiB each) so that a burst of
    logins cannot take every core from the other calls."""

    def __init__(
        self,
        *,
        concurrency: int = 4,
        wait_seconds: float = 5.0,
        time_cost: int = 2,
        memory_cost: int = 19 * 1024,
        parallelism: int = 1,
    ) -> None:
        self._hasher = Argon2Hasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            type=Type.ID,
        )
        self._slots = threading.BoundedSemaphore(concurrency)
        self._wait = wait_seconds

    def _slot(self) -> threading.BoundedSemaphore:
        if not self._slots.acquire(timeout=self._wait):
            raise Unavailable(
                "too many password checks in progress",
                retry_after_seconds=1.0,
                reason="HASHING_BUSY",
            )
        return self._slots

    def hash(self, password: str) -> str:
        slot = self._slot()
        try:
            return self._hasher.hash(password)
        finally:
            slot.release()

    def verify(self, password_hash: str, password: str) -> bool:
        slot = self._slot()
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        finally:
            slot.release()

    def needs_rehash(self, password_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True
