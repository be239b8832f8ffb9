"""What calls used, on its way to the auth service's ledger: summed in memory, sent in
batches, and never lost to a failed send.

The quota stage hands every ended call to `UsageLedger.record` (a dict update, on
the hot path). Once a second the sums go to the auth service as one RecordUsage
batch with an id of its own; a batch that fails is sent again with the same id (the
auth service counts a batch id once), and later calls start a new batch beside it.
A batch the auth service refuses as invalid is sent again record by record, so that
one bad record loses only itself. Stopping the gateway sends what is left.

With a spool directory, batches the auth service cannot take (it is away) are also kept
on disk, fsynced, once per failed send, and so are those still unsent when the gateway
stops: the next gateway to start over that directory sends them first, under the ids
they had (see usage_spool.py), so a call served during an outage is counted once even
if its gateway stops or dies before the auth service is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import grpc
import structlog
from tensorgate.auth.v1 import auth_pb2, auth_pb2_grpc

from gateway.quota import UsageRecord
from gateway.usage_spool import UsageSpool

log = structlog.get_logger("tensorgate.gateway.ledger")

_SEND_TIMEOUT_S = 5.0
# Answers that mean the batch itself is wrong, not that the auth service is away.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
_Key = tuple[str, str, str, str]  # tenant, key id, model, day
# The auth service's bound on one record's cost: a sum past it would be refused whole.
_MAX_COST = 1e9


def _summed(records: dict[_Key, list[float]], record: UsageRecord) -> None:
    # Plain numbers per call, a protobuf message per row only when a batch is sent.
    key = (record.tenant, record.key_id, record.model, record.day)
    total = records.get(key)
    if total is None:
        records[key] = [
            record.requests,
            record.errors,
            record.prompt_tokens,
            record.completion_tokens,
            record.compute_seconds,
            record.cost,
        ]
        return
    total[0] += record.requests
    total[1] += record.errors
    total[2] += record.prompt_tokens
    total[3] += record.completion_tokens
    total[4] += record.compute_seconds
    total[5] += record.cost


def _row(key: _Key, total: list[float]) -> auth_pb2.UsageRecord:
    tenant, key_id, model, day = key
    requests, errors, prompt, completion, compute_s, cost = total
    return auth_pb2.UsageRecord(
        tenant_id=tenant,
        key_id=key_id,
        model=model,
        day=day,
        requests=int(requests),
        errors=int(errors),
        prompt_tokens=int(prompt),
        completion_tokens=int(completion),
        compute_micros=round(compute_s * 1e6),
        cost=min(cost, _MAX_COST),
    )


class UsageLedger:
    """The gateway's `UsageSink`: batches usage to the auth service's RecordUsage."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        spool_dir: Path | None = None,
        flush_seconds: float = 1.0,
    ) -> None:
        self._stub = auth_pb2_grpc.AuthServiceStub(channel)
        self._flush_seconds = flush_seconds
        self._open: dict[_Key, list[float]] = {}
        self._unsent: list[auth_pb2.RecordUsageRequest] = []
        self._spool: UsageSpool | None = None
        if spool_dir is not None:
            # Before any call is served: what stopped gateways left goes first.
            self._spool, self._unsent = UsageSpool.open(spool_dir)
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def record(self, record: UsageRecord) -> None:
        _summed(self._open, record)

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_forever(), name="usage-ledger")

    async def _send_forever(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            try:
                await self.flush()
            except Exception:  # the loop must outlive any one failure
                log.exception("usage flush failed")

    async def flush(self) -> bool:
        """Sends everything recorded so far; True once nothing is left unsent."""
        if self._open:
            # Rows first: the sums are let go only once their batch exists.
            records = [_row(key, total) for key, total in self._open.items()]
            self._open = {}
            self._unsent.append(
                auth_pb2.RecordUsageRequest(batch_id=uuid.uuid4().hex, records=records)
            )
        while self._unsent:
            batch = self._unsent[0]
            try:
                await self._stub.RecordUsage(batch, timeout=_SEND_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _REFUSED:
                    # The auth service will never take this batch: holding it would block
                    # every later one behind it. A refused batch was not applied at all,
                    # so its records go again one per batch, each with an id of its own;
                    # a single refused record is said loudly, then dropped.
                    self._unsent.pop(0)
                    if len(batch.records) > 1:
                        self._unsent[:0] = [
                            auth_pb2.RecordUsageRequest(
                                batch_id=f"{batch.batch_id}.{n}", records=[record]
                            )
                            for n, record in enumerate(batch.records)
                        ]
                        continue
                    (record,) = batch.records  # a batch is never empty
                    log.error(
                        "usage record refused by the auth service; dropped",
                        error=exc.code().name,
                        details=(exc.details() or "")[:300],
                        tenant=record.tenant_id,
                        key_id=record.key_id,
                    )
                    continue
                # Kept and sent again with the same id: nothing is lost or counted twice.
                if not self._failing:
                    log.warning(
                        "usage not recorded yet; will retry",
                        error=exc.code().name,
                        batches=len(self._unsent),
                    )
                    self._failing = True
                if self._spool is not None:
                    await asyncio.to_thread(self._spool.keep, list(self._unsent))
                return False
            self._unsent.pop(0)
        if self._spool is not None and self._spool.holds_batches:
            await asyncio.to_thread(self._spool.clear)
        if self._failing:
            log.info("usage recorded again")
            self._failing = False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            sent = await self.flush()
        finally:
            if self._spool is not None:
                # Whatever ended the send: the batches it did not land stay on disk.
                self._spool.keep(self._unsent)
                self._spool.close()
        if not sent:
            unsent = sum(len(b.records) for b in self._unsent)
            if self._spool is not None:
                log.warning("usage records kept to send on the next start", records=unsent)
            else:
                log.error("usage records could not be sent before stopping", records=unsent)
