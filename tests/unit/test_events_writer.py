"""Group commit (events/writer.py) and the destination record, on SQLite in a temporary folder."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

from impuls.engine.results import InvocationResult, Outcome
from impuls.events import store
from impuls.events.dispatcher import destination_record
from impuls.events.writer import Batch, Writer
from impuls.store.db import open_engine
from impuls.store.schema import events

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path) -> Engine:
    return open_engine(f"sqlite:///{tmp_path}/impuls.db")


def _event(n: int) -> dict[str, object]:
    return store.event_values("fn", "$LATEST", json.dumps({"n": n}).encode(), "api", NOW)


def _count(db: Engine) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events)).scalar_one())


def test_concurrent_submits_share_transactions_and_all_commit(db: Engine) -> None:
    commits = 0
    original = Writer._run_batch

    def counting(self: Writer, batch: Batch) -> None:
        nonlocal commits
        commits += 1
        original(self, batch)

    async def main() -> None:
        writer = Writer(db)
        writer.start()
        batches = []
        for n in range(200):
            batch = Batch()
            batch.insert(events, _event(n))
            batches.append(writer.submit(batch))
        await asyncio.gather(*batches)
        await writer.close()

    Writer._run_batch = counting  # type: ignore[method-assign]
    try:
        asyncio.run(main())
    finally:
        Writer._run_batch = original  # type: ignore[method-assign]
    assert _count(db) == 200
    assert commits < 200  # they shared transactions (here: all in one or two)


def test_a_failing_batch_fails_alone(db: Engine) -> None:
    async def main() -> list[BaseException | None]:
        writer = Writer(db)
        writer.start()
        good, bad, also_good = Batch(), Batch(), Batch()
        good.insert(events, _event(1))
        duplicate = _event(2)
        bad.insert(events, duplicate)
        bad.insert(events, duplicate)  # the same primary key twice: this batch cannot commit
        also_good.insert(events, _event(3))
        results = await asyncio.gather(writer.submit(good), writer.submit(bad), writer.submit(also_good),
                                       return_exceptions=True)
        await writer.close()
        return [r if isinstance(r, BaseException) else None for r in results]

    first, second, third = asyncio.run(main())
    assert first is None and third is None and second is not None
    assert _count(db) == 2


def test_destination_record_has_lambdas_shape() -> None:
    event = store.Event.from_values(_event(7))
    ok = InvocationResult(event.request_id, Outcome.SUCCESS, False, payload=b'{"done": true}',
                          executed_version="$LATEST")
    record = destination_record(event, 1, "Success", ok, NOW, "123456789012")
    assert record == {
        "version": "1.0", "timestamp": "2026-01-02T03:04:05.000Z",
        "requestContext": {"requestId": event.request_id,
                           "functionArn": "arn:aws:lambda:us-east-1:123456789012:function:fn:$LATEST",
                           "condition": "Success", "approximateInvokeCount": 1},
        "requestPayload": {"n": 7},
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST"},
        "responsePayload": {"done": True},
    }
    failed = InvocationResult(event.request_id, Outcome.ERROR, False, error_type="ValueError",
                              error_message="bad", stack=["line"], executed_version="$LATEST")
    record = destination_record(event, 3, "RetriesExhausted", failed, NOW, "123456789012")
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert record["responsePayload"] == {"errorMessage": "bad", "errorType": "ValueError",
                                         "stackTrace": ["line"]}
    expired = destination_record(event, 0, "EventAgeExceeded", None, NOW, "123456789012")
    assert "responseContext" not in expired and expired["requestContext"]["approximateInvokeCount"] == 0
