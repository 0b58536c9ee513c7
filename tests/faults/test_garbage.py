"""Bodies protobuf cannot parse: INVALID_ARGUMENT for every method, and no memory kept.

grpcio parses the body before any interceptor runs; left alone it answers INTERNAL
("Exception deserializing request!"), logs a traceback, and keeps about 16 KB per request.
Here every method each server lists through reflection — its own service, grpc.health.v1
and reflection itself — gets each body of `GARBAGE`, with and without an access token,
sent raw through `channel.unary_unary(method)` (no serializer): the answer must be
INVALID_ARGUMENT with the reason MALFORMED_REQUEST. Then a flood: the server's RSS after
a warm-up of 5,000 garbage requests, and after 50,000 more, may grow by less than 30 MB.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest

from tests.faults.bodies import GARBAGE, Method, methods_of
from tests.faults.load import outcome
from tests.faults.services import (
    AGENT_SERVICE,
    AuthService,
    Caller,
    Fleet,
    agent_env,
    rss_mb,
)
from tests.helpers import ServiceProcess, free_port

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

WARM_UP = 5_000
FLOOD = 50_000
RSS_GROWTH_LIMIT_MB = 30.0
IN_FLIGHT = 64  # garbage requests on the wire at once


@dataclass
class Target:
    process: ServiceProcess
    methods: list[Method]


@pytest.fixture(scope="module")
def targets(
    module_auth: AuthService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[Target, Caller]]]:
    """The module's auth_svc and an agent_svc of its own (SQLite), with their methods."""
    root = tmp_path_factory.mktemp("garbage")
    fleet = Fleet(root / "logs")
    try:
        agent = fleet.start(
            "agent_svc", agent_env(free_port(), root / "agent", module_auth.address)
        )
        agent.wait_serving(AGENT_SERVICE, timeout=60)
        caller = module_auth.new_caller()
        found = {}
        for name, process in (("auth_svc", module_auth.process), ("agent_svc", agent)):
            with grpc.insecure_channel(process.address) as channel:
                found[name] = (Target(process, methods_of(channel)), caller)
        yield found
    finally:
        fleet.close()


@pytest.mark.parametrize("name", ["auth_svc", "agent_svc"])
def test_an_unparseable_body_is_invalid_argument_on_every_method(
    name: str,
    targets: dict[str, tuple[Target, Caller]],
    record_property: Callable[[str, object], None],
) -> None:
    target, caller = targets[name]
    services = {m.service for m in target.methods}
    assert {"grpc.health.v1.Health"} <= services, f"reflection lists {services}"
    answers = []
    with grpc.insecure_channel(target.process.address) as channel:
        for method, body, metadata in itertools.product(
            target.methods, GARBAGE, [(), caller.metadata]
        ):
            try:
                channel.unary_unary(method.path)(body, metadata=metadata, timeout=10)
                answers.append((method.path, body, bool(metadata), "OK", "", ""))
            except grpc.RpcError as error:
                code, reason, _, details = outcome(error)
                answers.append((method.path, body, bool(metadata), code.name, reason, details))
    record_property("answers", Counter((a[0], a[3], a[4]) for a in answers).most_common())
    wrong = [a for a in answers if (a[3], a[4]) != ("INVALID_ARGUMENT", "MALFORMED_REQUEST")]
    by_method = sorted(Counter((a[0], a[3], a[4]) for a in wrong).items())
    assert not wrong, (
        f"{len(wrong)} of {len(answers)} garbage bodies were not INVALID_ARGUMENT/"
        "MALFORMED_REQUEST: "
        + ", ".join(
            f"{method} {code}/{reason or '-'} x{n}" for (method, code, reason), n in by_method
        )
    )
    leaked = [a for a in answers if "Exception deserializing" in a[5]]
    assert not leaked, f"grpcio's own message reached the caller: {leaked[:3]}"


@pytest.mark.parametrize("name", ["auth_svc", "agent_svc"])
def test_a_garbage_flood_leaves_the_server_memory_flat(
    name: str,
    targets: dict[str, tuple[Target, Caller]],
    record_property: Callable[[str, object], None],
) -> None:
    target, caller = targets[name]
    pid = target.process.process.pid
    unary = [m for m in target.methods if not m.streaming]
    with grpc.insecure_channel(target.process.address) as channel:
        calls = [channel.unary_unary(m.path) for m in unary]
        bodies = itertools.cycle(itertools.product(calls, GARBAGE, [(), caller.metadata]))

        def flood(count: int) -> Counter[str]:
            codes: Counter[str] = Counter()
            sent = 0
            while sent < count:
                window = [
                    call.future(body, metadata=metadata, timeout=30)
                    for call, body, metadata in itertools.islice(
                        bodies, min(IN_FLIGHT, count - sent)
                    )
                ]
                for future in window:
                    codes[future.code().name] += 1
                sent += len(window)
            return codes

        flood(WARM_UP)
        before = rss_mb(pid)
        samples = [before]
        codes: Counter[str] = Counter()
        for _ in range(FLOOD // 5_000):
            codes += flood(5_000)
            samples.append(rss_mb(pid))
            if samples[-1] - before > RSS_GROWTH_LIMIT_MB:
                break  # already over the limit: no need for the other ~800 MB
    record_property("rss_mb_every_5000", [round(s, 1) for s in samples])
    record_property("codes", dict(codes))
    growth = samples[-1] - before
    sent = sum(codes.values())
    assert growth < RSS_GROWTH_LIMIT_MB, (
        f"{name} RSS grew {growth:.1f} MB over {sent} garbage requests after a warm-up of "
        f"{WARM_UP} ({growth * 1024 * 1024 / sent:.0f} bytes each); samples {samples}"
    )
