"""Reads over the invocation records for the console: counts, errors and latency percentiles
per time bucket, and the history of a function filtered by outcome.

The aggregate is one query: the database sorts each (function, bucket) by duration with
window functions and hands back only the rows at the percentile ranks, so the work stays in
the database and the answer is a few rows per bucket, however many calls there were.
Percentiles are nearest-rank (the ``ceil(p * n)``-th smallest duration), exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, Engine, bindparam, func, select, text

from impuls.engine.records import InvocationRecord
from impuls.store.schema import invocations

#: the percentiles every bucket carries, in per cent
PERCENTILES = (50, 90, 99)
OUTCOMES = ("success", "error", "init_error", "timeout", "oom", "crash")

_BUCKET_SQL = {
    "sqlite": "(CAST(strftime('%s', started_at) AS INTEGER) - :start_epoch) / :width",
    "postgresql": "CAST(FLOOR((EXTRACT(EPOCH FROM started_at) - :start_epoch) / :width) AS INTEGER)",
}

_RANKS = ", ".join(f"({p} * {{n}} + 99) / 100" for p in PERCENTILES)

_SERIES_SQL = """
WITH w AS (
    SELECT function_name AS fn, {bucket} AS b, duration_ms AS d,
           CASE WHEN outcome = 'success' THEN 0 ELSE 1 END AS e
    FROM invocations
    WHERE function_name IN :names AND started_at >= :start AND started_at < :end
), r AS (
    SELECT fn, b, d,
           ROW_NUMBER() OVER (PARTITION BY fn, b ORDER BY d) AS rb,
           COUNT(*) OVER (PARTITION BY fn, b) AS nb,
           SUM(e) OVER (PARTITION BY fn, b) AS eb,
           ROW_NUMBER() OVER (PARTITION BY fn ORDER BY d) AS ra,
           COUNT(*) OVER (PARTITION BY fn) AS na,
           SUM(e) OVER (PARTITION BY fn) AS ea
    FROM w
)
SELECT fn, b, d, rb, nb, eb, ra, na, ea FROM r
WHERE rb IN ({bucket_ranks}) OR ra IN ({all_ranks})
"""


@dataclass
class Bucket:
    """Calls that started in ``[start, start + width)``: how many, how many did not succeed,
    and the duration percentiles (ms; None when there was no call)."""

    start: datetime
    count: int = 0
    errors: int = 0
    percentiles: dict[int, float] = field(default_factory=dict)

    def p(self, percent: int) -> float | None:
        return self.percentiles.get(percent)


@dataclass
class Series:
    """One function's buckets, oldest first, and the whole window as one bucket (``total``)."""

    function_name: str
    start: datetime
    width: int
    buckets: list[Bucket]
    total: Bucket

    def counts(self) -> list[int]:
        return [b.count for b in self.buckets]

    def errors(self) -> list[int]:
        return [b.errors for b in self.buckets]

    def percentile(self, percent: int) -> list[float | None]:
        return [b.p(percent) for b in self.buckets]


def _rank(percent: int, n: int) -> int:
    return (percent * n + 99) // 100


def series(db: Engine, names: Sequence[str], end: datetime, buckets: int = 60,
           width: int = 60) -> dict[str, Series]:
    """Per function of ``names``: ``buckets`` buckets of ``width`` seconds, the last one holding
    ``end`` (buckets start at whole multiples of ``width`` since the epoch)."""
    end = datetime.fromtimestamp(-(-int(end.timestamp()) // width) * width + width, UTC)
    start = end - timedelta(seconds=width * buckets)
    out = {name: Series(name, start, width,
                        [Bucket(start + timedelta(seconds=width * i)) for i in range(buckets)],
                        Bucket(start)) for name in names}
    if not names:
        return out
    dialect = db.dialect.name
    sql = _SERIES_SQL.format(bucket=_BUCKET_SQL.get(dialect, _BUCKET_SQL["postgresql"]),
                             bucket_ranks=_RANKS.format(n="nb"), all_ranks=_RANKS.format(n="na"))
    query = text(sql).bindparams(bindparam("names", expanding=True),  # stored datetimes' format
                                 bindparam("start", type_=DateTime(timezone=True)),
                                 bindparam("end", type_=DateTime(timezone=True)))
    params: dict[str, Any] = {"names": list(names), "start": start, "end": end,
                              "start_epoch": int(start.timestamp()), "width": width}
    with db.connect() as conn:
        rows = conn.execute(query, params).all()
    for fn, b, d, rb, nb, eb, ra, na, ea in rows:
        s = out.get(fn)
        if s is None:
            continue
        duration = float(d)
        if 0 <= b < buckets:
            bucket = s.buckets[b]
            bucket.count, bucket.errors = int(nb), int(eb)
            for percent in PERCENTILES:
                if rb == _rank(percent, int(nb)):
                    bucket.percentiles[percent] = duration
        s.total.count, s.total.errors = int(na), int(ea)
        for percent in PERCENTILES:
            if ra == _rank(percent, int(na)):
                s.total.percentiles[percent] = duration
    return out


def _record(row: Any) -> InvocationRecord:
    m = dict(row._mapping)
    del m["id"]
    ts = m["started_at"]
    m["started_at"] = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return InvocationRecord(**m)


def history(db: Engine, name: str, outcome: str | None, limit: int,
            offset: int) -> tuple[list[InvocationRecord], int]:
    """A page of ``name``'s records, newest first (only ``outcome``'s when given), and how many
    there are in all."""
    where = [invocations.c.function_name == name]
    if outcome:
        where.append(invocations.c.outcome == outcome)
    with db.connect() as conn:
        rows = conn.execute(select(invocations).where(*where)
                            .order_by(invocations.c.started_at.desc(), invocations.c.id.desc())
                            .limit(limit).offset(offset)).all()
        total = conn.execute(select(func.count()).select_from(invocations).where(*where)).scalar_one()
    return [_record(r) for r in rows], int(total)


def records_of(db: Engine, name: str, request_id: str) -> list[InvocationRecord]:
    """Every record of one request id (an asynchronous event's attempts share it), oldest first."""
    with db.connect() as conn:
        rows = conn.execute(select(invocations).where(invocations.c.function_name == name,
                                                      invocations.c.request_id == request_id)
                            .order_by(invocations.c.started_at, invocations.c.id)).all()
    return [_record(r) for r in rows]
