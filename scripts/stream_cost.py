"""What one streamed message costs the server: the sync grpc.server (how WatchAgents is
served) against grpc.aio, each streaming small messages to many concurrent streams.

    python scripts/stream_cost.py               # 200 streams x 500 messages, twice each
    STREAMS=1000 MESSAGES=100 python scripts/stream_cost.py

Each server runs in a process of its own (generic handlers, bytes in and out: no protobuf
work); the clients are one grpc.aio process. Printed: the server's CPU time (user +
system, from /proc) per message delivered, and the wall time. Linux only (/proc).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc

STREAMS = int(os.environ.get("STREAMS", "200"))
MESSAGES = int(os.environ.get("MESSAGES", "500"))
PAYLOAD = b"x" * 300  # about one agent change on the wire
METHOD = "/bench.Feed/Stream"


def _handler(stream: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "bench.Feed", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )


def serve_sync(port: int) -> None:
    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(MESSAGES):
            yield PAYLOAD

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=STREAMS + 8))
    server.add_generic_rpc_handlers((_handler(stream),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def serve_aio(port: int) -> None:
    async def main() -> None:
        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            for _ in range(MESSAGES):
                yield PAYLOAD

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(stream),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _receive_all(port: int) -> int:
    async def main() -> int:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(METHOD)

            async def one() -> int:
                return sum([1 async for _ in call(b"")])

            return sum(await asyncio.gather(*(one() for _ in range(STREAMS))))

    return asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    for kind in ("sync", "aio", "sync", "aio"):
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "serve", kind, str(port)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            server.stdout.readline()  # "ready"
            cpu, wall = _cpu_seconds(server.pid), time.perf_counter()
            delivered = _receive_all(port)
            cpu, wall = _cpu_seconds(server.pid) - cpu, time.perf_counter() - wall
        finally:
            server.kill()
            server.wait()
        print(
            f"{kind:4}  {STREAMS} streams, {delivered} messages: "
            f"server CPU {cpu / delivered * 1e6:.1f} µs per message, wall {wall:.2f} s",
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        (serve_sync if sys.argv[2] == "sync" else serve_aio)(int(sys.argv[3]))
    else:
        main()
