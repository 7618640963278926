"""The soak of ``bench/soak.py``, shortened: 10,000 mixed calls at concurrency 64 on the namespace
sandbox while instances are SIGKILLed and the server is SIGKILLed and started again once, on
SQLite and on PostgreSQL.

Every call must get the documented answer for its function (or, when its instance or the server
was killed under it, the documented answer for that), no call may outlive its function's timeout
plus the queue timeout plus a second, every accepted event must succeed, nothing of the sandboxes
may be left after the server stops.  The check on the server's figures only catches gross leaks
(a short run's slopes are mostly warm-up); nothing here depends on how fast the machine is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import MIX, Limits, soak, summary
from tests.helpers import sandbox_unavailable

pytestmark = [pytest.mark.namespace, pytest.mark.timeout(900)]

CALLS = 10_000
GROSS = Limits(rss_mib=512.0, fds=500.0, threads=100.0)


def test_mixed_calls_under_chaos_get_their_documented_answers(
        store_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    reason = sandbox_unavailable("namespace", request)
    if reason:
        pytest.skip(f"namespace sandbox unavailable: {reason}")
    database_url = store_env.get("IMPULS_DATABASE_URL", "")
    tally = soak(tmp_path, CALLS, concurrency=64, database_url=database_url, limits=GROSS)
    report = summary(tally, "PostgreSQL" if database_url else "SQLite")
    print(report)
    assert not tally.failures, report
    # the run did what it is meant to: every kind of call, kills of both kinds, the restart, deploys
    assert tally.calls == CALLS, report
    kinds = {key.split(":")[0] for key in tally.answers}
    assert kinds == set(MIX), report
    assert tally.kills["server"] == 1 and tally.kills["sandbox"] and tally.kills["runtime"], report
    assert tally.deploys["update code"] and tally.deploys["create"], report
    assert tally.accepted and tally.events["succeeded"] == len(tally.accepted), report
