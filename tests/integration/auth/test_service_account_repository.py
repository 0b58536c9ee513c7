"""Service accounts on SQLite and PostgreSQL: what the token endpoint and the admin RPCs
rely on from the tables (each test: a fresh database, migrated)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from services.auth_svc.domain import ClientKey, ClientSecret, ServiceAccount
from services.auth_svc.repository.sql import SqlAuthUnitOfWork
from services.auth_svc.service.ports import KeyExists

UowFactory = Callable[[], SqlAuthUnitOfWork]
T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def an_account(when: datetime = T0, **changes: object) -> ServiceAccount:
    fields: dict[str, object] = {
        "id": uuid.uuid4(),
        "display_name": "billing",
        "scopes": ("agents.read", "delegate"),
        "create_time": when,
        "secrets": (ClientSecret(uuid.uuid4(), "a" * 64, when),),
    }
    fields.update(changes)
    return ServiceAccount(**fields)  # type: ignore[arg-type]


def add(uow: UowFactory, account: ServiceAccount) -> ServiceAccount:
    with uow() as work:
        work.service_accounts.add(account)
        work.commit()
    return account


def get(uow: UowFactory, account_id: uuid.UUID) -> ServiceAccount | None:
    with uow() as work:
        return work.service_accounts.get(account_id)


def test_an_account_reads_back_with_its_secrets_and_keys(uow: UowFactory) -> None:
    account = add(uow, an_account())
    key = ClientKey("kid-1", "EdDSA", "-----BEGIN PUBLIC KEY-----\n...", T0)
    second = ClientSecret(uuid.uuid4(), "b" * 64, T0 + timedelta(seconds=1))
    with uow() as work:
        work.service_accounts.add_key(account.id, key)
        work.service_accounts.add_secret(account.id, second)
        work.commit()
    stored = get(uow, account.id)
    assert stored == ServiceAccount(
        id=account.id,
        display_name="billing",
        scopes=("agents.read", "delegate"),
        create_time=T0,
        secrets=(account.secrets[0], second),
        keys=(key,),
    )


def test_a_duplicate_key_is_refused_without_spoiling_the_transaction(uow: UowFactory) -> None:
    account = add(uow, an_account())
    key = ClientKey("kid-1", "EdDSA", "pem", T0)
    with uow() as work:
        work.service_accounts.add_key(account.id, key)
        work.commit()
    with uow() as work:
        with pytest.raises(KeyExists):
            work.service_accounts.add_key(account.id, key)
        work.service_accounts.add_key(account.id, ClientKey("kid-2", "ES256", "pem", T0))
        work.commit()
    stored = get(uow, account.id)
    assert stored is not None
    assert [k.kid for k in stored.keys] == ["kid-1", "kid-2"]


def test_deleting_takes_the_secrets_and_keys_with_it(uow: UowFactory) -> None:
    account = add(uow, an_account())
    other = add(uow, an_account())
    with uow() as work:
        work.service_accounts.add_key(account.id, ClientKey("kid", "EdDSA", "pem", T0))
        assert work.service_accounts.delete(account.id)
        assert not work.service_accounts.delete(uuid.uuid4())
        work.commit()
    assert get(uow, account.id) is None
    assert get(uow, other.id) == other
    with uow() as work:  # nothing of it is left behind to come back with its id
        assert not work.service_accounts.remove_secret(account.id, account.secrets[0].id)
        assert not work.service_accounts.remove_key(account.id, "kid")


def test_pages_follow_creation_order_and_never_repeat(uow: UowFactory) -> None:
    same_time = [add(uow, an_account(T0)) for _ in range(3)]
    later = add(uow, an_account(T0 + timedelta(seconds=1)))
    expected = [*sorted(same_time, key=lambda a: a.id), later]
    seen: list[uuid.UUID] = []
    after = None
    with uow() as work:
        while page := work.service_accounts.page(after=after, limit=2):
            seen += [a.id for a in page]
            after = (page[-1].create_time, page[-1].id)
    assert seen == [a.id for a in expected]


def test_last_use_moves_only_forward_past_the_threshold(uow: UowFactory) -> None:
    account = add(uow, an_account())
    with uow() as work:
        work.service_accounts.touch(account.id, T0, not_since=T0 - timedelta(minutes=1))
        work.commit()
    with uow() as work:  # within the minute: no write
        work.service_accounts.touch(
            account.id, T0 + timedelta(seconds=30), not_since=T0 - timedelta(seconds=30)
        )
        work.commit()
    stored = get(uow, account.id)
    assert stored is not None
    assert stored.last_used_time == T0


def test_an_assertion_is_used_once_even_by_racing_replicas(uow: UowFactory) -> None:
    barrier = threading.Barrier(4)
    results: list[bool] = []

    def use() -> None:
        barrier.wait()
        with uow() as work:
            ok = work.service_accounts.use_assertion("d" * 64, T0)
            work.commit()
        results.append(ok)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True]


def test_expired_assertions_are_purged_and_live_ones_kept(uow: UowFactory) -> None:
    with uow() as work:
        work.service_accounts.use_assertion("old", T0)
        work.service_accounts.use_assertion("live", T0 + timedelta(minutes=5))
        work.commit()
    with uow() as work:
        assert work.service_accounts.purge_assertions(T0 + timedelta(seconds=1)) == 1
        work.commit()
    with uow() as work:
        assert work.service_accounts.use_assertion("old", T0)  # forgotten: usable again
        assert not work.service_accounts.use_assertion("live", T0)


def test_the_one_statement_read_sees_what_get_sees(uow: UowFactory) -> None:
    account = add(uow, an_account())
    with uow() as work:
        for n in range(2):
            work.service_accounts.add_key(
                account.id, ClientKey(f"kid-{n}", "EdDSA", f"pem-{n}", T0 + timedelta(seconds=n))
            )
            work.service_accounts.add_secret(
                account.id, ClientSecret(uuid.uuid4(), f"{n}" * 64, T0 + timedelta(seconds=n + 1))
            )
        work.commit()
    full = get(uow, account.id)
    assert full is not None
    assert (len(full.secrets), len(full.keys)) == (3, 2)
    # As the token endpoint uses it: the only statement of its unit of work.
    with uow() as work:
        assert work.service_accounts.credentials(account.id) == full
    with uow() as work:
        assert work.service_accounts.credentials(uuid.uuid4()) is None
