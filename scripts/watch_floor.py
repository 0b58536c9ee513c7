"""The floor under WatchAgents' fan-out target on this machine: the same shape with nothing
of the service in it.

    python scripts/watch_floor.py                    # 1,000 streams, 100 changes/s
    python scripts/watch_floor.py --rounds 0.05,0.065,0.08,0.1

A bare grpc.aio server (bytes in and out, no database, no token check, no protobuf work)
streams to `--streams` streams held by 4 grpc.aio client processes (the benchmark's
stream holders, as lean: one loop each, the messages only timed). A thread makes
`--rate` changes a second (a timestamp and `--payload` bytes each, about one agent change
on the wire) and hands them to the loop once per round (`--rounds`: the seconds between
rounds, as AGENT_WATCH_BATCH_SECONDS paces the hub); each stream then sends everything it
has not had in one message. Printed per round length: the server's and the holders' CPU,
messages, changes per message, and commit-to-delivery latency over every delivery.

Server on core 0, holders on core 1 (as scripts/bench.py pins them). What the service
adds on top of this is its own cost; what this cannot reach, the service cannot either.
Linux only (/proc, sched_setaffinity).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from agentplatform.client import WATCH_CHANNEL_OPTIONS

METHOD = "/bench.Feed/Stream"
HOLDERS = 4
CHANNELS_PER_HOLDER = 2
STEP = 0.0005  # seconds: the latency histogram's resolution
_STAMP = struct.Struct(">d")


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})


def _record(payload: int) -> bytes:
    """One change as a `repeated bytes` field: tag, length, the time it was made, filler."""
    body = _STAMP.pack(time.time()) + b"x" * (payload - _STAMP.size)
    length = bytearray()
    size = len(body)
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return b"\x0a" + bytes(length) + body


def _serve(port: int, rate: float, round_seconds: float, payload: int, ready: Any) -> None:
    _pin(0)

    async def main() -> None:
        changes: list[bytes] = []
        event = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            position = len(changes)
            yield b""  # open
            while True:
                if position < len(changes):
                    part, position = changes[position:], len(changes)
                    yield b"".join(part)
                    continue
                event.clear()
                await event.wait()

        def publish(batch: list[bytes]) -> None:
            changes.extend(batch)
            event.set()

        def produce() -> None:
            pending: list[bytes] = []
            count, start, last = 0, time.perf_counter(), 0.0
            while True:
                pause = start + count / rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                pending.append(_record(payload))
                count += 1
                if time.perf_counter() - last >= round_seconds:
                    last = time.perf_counter()
                    loop.call_soon_threadsafe(publish, pending)
                    pending = []

        server = grpc.aio.server()
        handler = grpc.unary_stream_rpc_method_handler(stream)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Feed", {"Stream": handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        threading.Thread(target=produce, daemon=True).start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _hold(  # noqa: PLR0917 - a Process target's arguments
    port: int, count: int, payload: int, ready: Any, stop: Any, out: Any
) -> None:
    _pin(1)

    async def main() -> None:
        histogram: dict[int, int] = {}
        counters = {"messages": 0, "opened": 0}
        channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{port}",
                options=[
                    ("grpc.so_reuseport", 0),
                    ("grpc.use_local_subchannel_pool", 1),
                    *WATCH_CHANNEL_OPTIONS,  # as the typed client's watch channel
                ],
            )
            for _ in range(CHANNELS_PER_HOLDER)
        ]
        calls = [channel.unary_stream(METHOD) for channel in channels]
        size = payload + 3  # tag, two length bytes (payloads of 128 to 16,383 bytes)

        async def one(n: int) -> None:
            first = True
            async for data in calls[n % len(calls)](b""):
                now = time.time()
                if first:
                    first = False
                    counters["opened"] += 1
                    if counters["opened"] == count:
                        ready.set()
                    continue
                counters["messages"] += 1
                for offset in range(0, len(data), size):
                    (made,) = _STAMP.unpack_from(data, offset + 3)
                    bucket = int((now - made) / STEP)
                    histogram[bucket] = histogram.get(bucket, 0) + 1

        tasks = [asyncio.create_task(one(n)) for n in range(count)]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.put((histogram, counters["messages"]))

    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _quantile(histogram: dict[int, int], q: float) -> float:
    total, seen = sum(histogram.values()), 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= q * total:
            return (bucket + 1) * STEP
    return float("nan")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measure(args: argparse.Namespace, round_seconds: float) -> str:
    ctx = multiprocessing.get_context("spawn")
    port, served = _free_port(), ctx.Event()
    server = ctx.Process(
        target=_serve, args=(port, args.rate, round_seconds, args.payload, served), daemon=True
    )
    server.start()
    stop, out = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(HOLDERS)]
    holders = [
        ctx.Process(
            target=_hold,
            args=(port, args.streams // HOLDERS, args.payload, ready, stop, out),
            daemon=True,
        )
        for ready in readies
    ]
    try:
        if not served.wait(60):
            raise RuntimeError("the server did not start")
        for holder in holders:
            holder.start()
        for ready in readies:
            if not ready.wait(120):
                raise RuntimeError("the streams did not all open")
        time.sleep(2.0)  # past the start (the changes flow from the server's start)
        pids = [h.pid for h in holders if h.pid]
        assert server.pid is not None
        cpu, held, wall = _cpu_seconds(server.pid), sum(map(_cpu_seconds, pids)), time.monotonic()
        time.sleep(args.seconds)
        wall = time.monotonic() - wall
        cpu = (_cpu_seconds(server.pid) - cpu) / wall
        held = (sum(map(_cpu_seconds, pids)) - held) / wall
        stop.set()
        histogram: dict[int, int] = {}
        messages = 0
        for _ in holders:
            got, sent = out.get(timeout=120)
            messages += sent
            for bucket, deliveries in got.items():
                histogram[bucket] = histogram.get(bucket, 0) + deliveries
    finally:
        for process in (server, *holders):
            with contextlib.suppress(Exception):
                process.kill()
    deliveries = sum(histogram.values())
    return (
        f"round {round_seconds * 1e3:>4.0f} ms: server {cpu:.0%} of its core, holders {held:.0%} "
        f"of theirs; {messages:,} messages, {deliveries / max(1, messages):.1f} changes each; "
        f"commit-to-delivery p50 {_quantile(histogram, 0.5) * 1e3:.1f} ms, "
        f"p99 {_quantile(histogram, 0.99) * 1e3:.1f} ms, "
        f"max {_quantile(histogram, 1.0) * 1e3:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="changes a second")
    parser.add_argument("--payload", type=int, default=300, help="bytes per change (128+)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured, per round length")
    parser.add_argument(
        "--rounds", default="0.05,0.065,0.08,0.1", help="seconds between rounds, comma-separated"
    )
    args = parser.parse_args()
    if not 128 <= args.payload < 16_384:
        parser.error("--payload: 128 to 16,383 bytes")
    print(
        f"bare grpc.aio fan-out: {args.streams:,} streams, {args.rate:.0f} changes/s of "
        f"{args.payload} bytes (target of WatchAgents: p99 < 100 ms)",
        flush=True,
    )
    for round_seconds in (float(r) for r in args.rounds.split(",")):
        print(measure(args, round_seconds), flush=True)


if __name__ == "__main__":
    main()
