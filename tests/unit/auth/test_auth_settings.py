"""auth_svc's own settings: the password-hashing pool."""

from __future__ import annotations

import pytest

from services.auth_svc.settings import load_auth_settings
from shared.config.settings import ConfigError


def test_hashing_defaults_to_two_threads_and_as_many_waiting() -> None:
    settings = load_auth_settings({})
    assert (settings.hash_concurrency, settings.hash_queue) == (2, 2)


def test_the_queue_follows_the_concurrency_unless_set() -> None:
    settings = load_auth_settings({"AUTH_HASH_CONCURRENCY": "3"})
    assert (settings.hash_concurrency, settings.hash_queue) == (3, 3)
    settings = load_auth_settings({"AUTH_HASH_CONCURRENCY": "3", "AUTH_HASH_QUEUE": "0"})
    assert (settings.hash_concurrency, settings.hash_queue) == (3, 0)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"AUTH_HASH_CONCURRENCY": "0"}, "AUTH_HASH_CONCURRENCY must be at least 1"),
        ({"AUTH_HASH_QUEUE": "-1"}, "AUTH_HASH_QUEUE must be at least 0"),
        ({"AUTH_HASH_QUEUE": "many"}, "AUTH_HASH_QUEUE must be an integer"),
    ],
)
def test_bad_hashing_settings_are_refused(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_auth_settings(env)
