"""Failover with real processes and real signals: two workers (each with its own bundled
Triton) and two gateways, started by the local launcher as `tensorgate up --workers 2
--gateways 2` starts them, under a steady mixed load (unary Infer loops on digits and
Generate loops on tinylm) through one gateway.

- a rolling restart of both workers with SIGTERM fails no call, and the streams in flight
  on a draining worker finish;
- kill -9 of a worker: unary calls succeed through the gateway's retry, streams that were
  on it end with UNAVAILABLE and nothing else, and it serves again once restarted;
- SIGTERM on a gateway: it says NOT_SERVING, its streams in flight finish, new calls to it
  are refused, and the other gateway serves on throughout.

One platform serves the whole module; each test leaves it whole (what it stopped runs
again). Which worker served a call comes from the gateways' canonical log lines.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorgate import AsyncGatewayClient, TensorgateClientError

from launcher.local import LocalPlatform

REPO = Path(__file__).resolve().parents[2]
IMAGE = np.asarray(
    json.loads((REPO / "models" / "examples" / "digits.json").read_text()), dtype=np.float32
)
# tinylm makes hundreds of tokens a second; streams this long are in flight for a
# while under load, short enough that a test stays quick.
MAX_TOKENS = 200
STREAMS, UNARY = 4, 2  # 4: both workers' tinylm generating for two streams each
PAUSE_S = 0.4  # between one stream and the next in a loop; a quarter of it between unary calls
START_S = 240.0  # generous: two Tritons loading torch on a busy 2-core machine
GATEWAY_CALL = "/tensorgate.gateway.v1.InferenceGateway/"
ROUTED = {GATEWAY_CALL + "Infer", GATEWAY_CALL + "Generate"}

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LocalPlatform]:
    data_dir = tmp_path_factory.mktemp("failover")
    running = LocalPlatform(
        gateway_port=0,
        workers=2,
        gateways=2,
        data_dir=data_dir,
        log_file=data_dir / "logs" / "services.log",
    )
    await running.start(timeout=START_S)
    try:
        yield running
    finally:
        await running.stop()


class Load:
    """Unary and streaming calls through one gateway, in loops, until the block ends."""

    def __init__(self, address: str, api_key: str, *, streams: int = STREAMS) -> None:
        self._client = AsyncGatewayClient(address, api_key=api_key)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._streams = streams
        # Per stream loop: the tokens its current stream has sent so far.
        self._tokens = [0] * streams
        self._pause_s = PAUSE_S
        self.unary_ok = self.streams_ok = 0
        self.unary_failures: list[str] = []
        # Streams that failed after their first chunk (cut), and before it (refused).
        self.cut: list[TensorgateClientError] = []
        self.refused: list[TensorgateClientError] = []
        self.unfinished: list[str] = []  # streams that ended OK, short of MAX_TOKENS

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._unary()) for _ in range(UNARY)]
        self._tasks += [asyncio.create_task(self._generate(i)) for i in range(self._streams)]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.close()

    async def all_streaming(self) -> None:
        """Returns at a moment when every stream loop's stream is sending tokens and at
        most one of them is in its last quarter (greedy tinylm always makes MAX_TOKENS).

        A worker generates for two streams at once (tinylm's max_concurrency), so with
        four loops all sending, each worker has two, and at least one of those has a
        quarter of its tokens to come: what this process has read lags the gateway by
        some milliseconds on a busy machine, so a stream about to end could end before
        a signal lands. Meanwhile the loops run back to back; otherwise they pause
        between calls, so the load stays steady but leaves the (2-core) machine room to
        restart a worker: Triton loading torch beside a busy load took thrice as long.
        """
        self._pause_s = 0.0
        try:
            await _eventually(
                lambda: (
                    min(self._tokens) >= 1
                    and sum(tokens > MAX_TOKENS * 3 // 4 for tokens in self._tokens) <= 1
                ),
                "every stream loop sending tokens",
            )
        finally:
            self._pause_s = PAUSE_S

    async def _unary(self) -> None:
        while not self._stop.is_set():
            try:
                outputs = await self._client.infer("digits", {"image": IMAGE}, timeout=30)
                assert outputs["label"].shape == (4, 1)
                self.unary_ok += 1
            except TensorgateClientError as exc:
                self.unary_failures.append(str(exc))
            await asyncio.sleep(self._pause_s / 4)

    async def _generate(self, index: int) -> None:
        while not self._stop.is_set():
            finish = chunks = 0
            try:
                async for chunk in self._client.generate(
                    "tinylm", "ROMEO:\n", max_tokens=MAX_TOKENS, temperature=0.0, timeout=60
                ):
                    self._tokens[index] += len(chunk.token_ids)
                    chunks += 1
                    finish = chunk.finish_reason
                if finish and self._tokens[index] == MAX_TOKENS:
                    self.streams_ok += 1
                else:  # ended OK but not whole
                    self.unfinished.append(f"{self._tokens[index]} tokens, finish {finish}")
            except TensorgateClientError as exc:
                (self.cut if chunks else self.refused).append(exc)
            finally:
                self._tokens[index] = 0
            await asyncio.sleep(self._pause_s)


class GatewayLines:
    """The gateways' canonical lines for routed calls (Infer, Generate) in the platform's
    log, read on from where the last read ended (the log grows by thousands of lines)."""

    def __init__(self, platform: LocalPlatform) -> None:
        assert platform.log_file is not None
        self._file = platform.log_file
        self._offset = self._file.stat().st_size  # from now on
        self.calls: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        with self._file.open("rb") as log:
            log.seek(self._offset)
            text = log.read()
        whole = text[: text.rfind(b"\n") + 1]
        self._offset += len(whole)
        for line in whole.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "rpc" and entry.get("method") in ROUTED:
                self.calls.append(entry)
        return self.calls

    def served_by(self, worker: str, since: int = 0) -> int:
        """Calls `worker` served OK among the lines from index `since` on."""
        return sum(c.get("worker") == worker and c["status"] == "OK" for c in self.read()[since:])


async def _eventually(
    check: Callable[[], bool], what: str, *, timeout: float = 120.0, interval: float = 0.01
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)


async def _rejoin(platform: LocalPlatform, name: str, lines: GatewayLines) -> None:
    """Starts worker `name` again and waits until the gateway routes calls to it."""
    address = platform.worker_addresses[platform.worker_names.index(name)]
    since = len(lines.read())
    started = time.monotonic()
    await platform.respawn(name)
    await platform.wait_worker_serving(address, START_S)
    serving = time.monotonic() - started
    await _eventually(
        lambda: lines.served_by(address, since) >= 5,
        f"calls served by {name} again",
        interval=0.2,
    )
    # Shown when a test fails: where its time went.
    routed = time.monotonic() - started
    print(f"{name}: serving {serving:.1f}s after its start, routed to {routed:.1f}s")


async def test_a_rolling_restart_of_both_workers_with_sigterm_fails_no_call(
    platform: LocalPlatform,
) -> None:
    lines = GatewayLines(platform)
    drained: dict[str, list[dict[str, Any]]] = {}
    async with Load(platform.gateway_address, platform.admin_key) as load:
        for name, address in zip(platform.worker_names, platform.worker_addresses, strict=True):
            await _eventually(lambda: load.streams_ok >= 10, "streams before the restart")
            # Every stream loop mid-stream: least-outstanding routing has put some on each
            # worker, so the one that gets SIGTERM has streams to finish while it drains.
            await load.all_streaming()
            signalled = time.time()
            child = platform.child(name)
            code = await child.stop(timeout=60)  # SIGTERM; SIGKILL only after 60 s
            assert code == 0 and not child.killed, f"{name} exited with {code}"
            # Streams this worker served that were under way when it was told to stop.
            drained[name] = [
                call
                for call in lines.read()
                if call.get("worker") == address
                and call["method"].endswith("/Generate")
                and _ended_at(call) > signalled > _ended_at(call) - call["duration_ms"] / 1000
            ]
            await _rejoin(platform, name, lines)
        ok_before = load.unary_ok, load.streams_ok
        await _eventually(
            lambda: load.unary_ok > ok_before[0] + 20 and load.streams_ok > ok_before[1] + 5,
            "calls after the restarts",
        )
    assert load.unary_failures == [] and load.unfinished == []
    assert load.cut == [] and load.refused == []
    for name, calls in drained.items():
        assert calls, f"no stream was in flight on {name} when it got SIGTERM"
        assert all(call["status"] == "OK" for call in calls), calls
    calls = lines.read()
    for address in platform.worker_addresses:
        served = {c["method"] for c in calls if c.get("worker") == address and c["status"] == "OK"}
        assert served == ROUTED, (address, served)


def _ended_at(call: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(call["timestamp"]).replace("Z", "+00:00")).timestamp()


async def test_kill_9_of_a_worker_under_load(platform: LocalPlatform) -> None:
    name, address = platform.worker_names[1], platform.worker_addresses[1]
    lines = GatewayLines(platform)
    async with Load(platform.gateway_address, platform.admin_key) as load:
        await _eventually(lambda: load.streams_ok >= 10, "streams before the kill")
        # Every loop has a stream that sent a chunk: the victim has at least one of
        # them, which the gateway may not retry (its caller saw tokens).
        await load.all_streaming()
        child = platform.child(name)
        child.signal_group(signal.SIGKILL)
        assert await child.wait() == -signal.SIGKILL
        ok_at_kill = load.unary_ok, load.streams_ok
        await _eventually(
            lambda: load.unary_ok > ok_at_kill[0] + 50 and load.streams_ok > ok_at_kill[1] + 10,
            "calls served by the remaining worker",
        )
        await _rejoin(platform, name, lines)
    # A stream that had sent no token yet was retried on the other worker.
    assert load.unary_failures == [] and load.unfinished == [] and load.refused == []
    assert load.cut, "no stream was cut by the kill"
    assert {cut.code for cut in load.cut} == {grpc.StatusCode.UNAVAILABLE}, [
        str(cut) for cut in load.cut
    ]
    failed = [c for c in lines.read() if c["status"] != "OK"]
    assert len(failed) == len(load.cut), failed
    assert all(c.get("worker") == address and c["method"].endswith("/Generate") for c in failed)


async def _first_status(watch: Any) -> int:
    response = await watch.read()
    return int(response.status)


STREAMS_IN_FLIGHT = 2


async def test_sigterm_on_a_gateway_finishes_its_streams_while_the_other_serves(
    platform: LocalPlatform,
) -> None:
    name, address = platform.gateway_names[0], platform.gateway_addresses[0]
    other = platform.gateway_addresses[1]
    async with (
        # Three streams in all: both workers can generate for each of them at once.
        Load(other, platform.admin_key, streams=1) as elsewhere,
        Load(address, platform.admin_key, streams=STREAMS_IN_FLIGHT) as draining,
        grpc.aio.insecure_channel(address) as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert await _first_status(watch) == health_pb2.HealthCheckResponse.SERVING
        await _eventually(lambda: draining.streams_ok >= 4, "streams through the gateway")
        await draining.all_streaming()
        in_flight = draining.streams_ok + STREAMS_IN_FLIGHT
        child = platform.child(name)
        child.signal_group(signal.SIGTERM)
        status = await asyncio.wait_for(_first_status(watch), 30)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await asyncio.wait_for(child.wait(), 60) == 0
        # Gone: a new call to it is refused, by a client that never talked to it before.
        async with AsyncGatewayClient(address, api_key=platform.admin_key) as late:
            with pytest.raises(TensorgateClientError) as refused:
                await late.infer("digits", {"image": IMAGE}, timeout=10)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        ok_then = elsewhere.unary_ok, elsewhere.streams_ok
        await _eventually(
            lambda: elsewhere.unary_ok > ok_then[0] + 20 and elsewhere.streams_ok > ok_then[1] + 5,
            "calls through the other gateway",
        )
        await platform.respawn(name)
        await platform.wait_gateway_serving(address, START_S)
    # The streams in flight when the gateway was told to stop all ended whole; the loops
    # that went on calling it were refused (UNAVAILABLE) once it stopped taking calls.
    assert draining.cut == [] and draining.unfinished == []
    assert draining.streams_ok >= in_flight
    assert draining.refused, "no call was refused after the gateway stopped"
    assert {refused.code for refused in draining.refused} == {grpc.StatusCode.UNAVAILABLE}
    assert all(failure.startswith("UNAVAILABLE") for failure in draining.unary_failures), (
        draining.unary_failures
    )
    assert elsewhere.unary_failures == [] and elsewhere.unfinished == []
    assert elsewhere.cut == [] and elsewhere.refused == []
