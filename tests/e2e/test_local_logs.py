"""The local platform's log is whole lines: the worker and the gateway log at once under
load (calls made with the admin key it made), and every line of the file parses as JSON
once the platform has stopped; the key is in none of them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from tensorgate import AsyncGatewayClient

from launcher.local import LocalPlatform

REPO = Path(__file__).resolve().parents[2]
ROUNDS, UNARY, STREAMS = 3, 250, 6


async def _load(client: AsyncGatewayClient) -> None:
    """Rounds of many concurrent unary calls with a few streams beside them."""
    rows = json.loads((REPO / "models" / "examples" / "digits.json").read_text())
    image = np.asarray(rows, dtype=np.float32)

    async def generate(seed: int) -> int:
        chunks = 0
        async for _ in client.generate("tinylm", "ROMEO:\n", max_tokens=64, seed=seed):
            chunks += 1
        return chunks

    for _ in range(ROUNDS):
        results = await asyncio.gather(
            *(client.infer("digits", {"image": image}) for _ in range(UNARY)),
            *(generate(seed) for seed in range(STREAMS)),
        )
        assert all(chunks for chunks in results[UNARY:])


async def test_every_line_of_both_services_is_whole_json_under_load(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "services.log"
    platform = LocalPlatform(gateway_port=0, data_dir=tmp_path, log_file=log_file)
    await platform.start(timeout=240)
    try:
        assert platform.admin_key_created and platform.admin_key.startswith("tg_")
        async with AsyncGatewayClient(
            platform.gateway_address, api_key=platform.admin_key
        ) as client:
            await _load(client)
    finally:
        await platform.stop()

    text = log_file.read_bytes()
    assert platform.admin_key.encode() not in text, "an API key reached a log line"
    lines = text.split(b"\n")
    assert lines.pop() == b"", "the log ends with a whole line"
    broken = []
    methods: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            broken.append(f"{number}: {line[:200]!r}")
            continue
        for value in entry.values():
            if isinstance(value, str) and value.startswith("/tensorgate."):
                methods[value] = methods.get(value, 0) + 1
    assert not broken, f"{len(broken)} of {len(lines)} lines are not JSON:\n" + "\n".join(
        broken[:10]
    )
    # One canonical line per call from each service: none lost, none merged.
    calls = ROUNDS * UNARY
    assert methods.get("/tensorgate.gateway.v1.InferenceGateway/Infer", 0) >= calls, methods
    assert methods.get("/tensorgate.worker.v1.InferenceWorker/Infer", 0) >= calls, methods
    streams = ROUNDS * STREAMS
    assert methods.get("/tensorgate.gateway.v1.InferenceGateway/Generate", 0) >= streams, methods
    assert methods.get("/tensorgate.worker.v1.InferenceWorker/Generate", 0) >= streams, methods
