"""docs/lambda-api.md and the Lambda door never disagree on which operations exist."""

from __future__ import annotations

import re

from impuls.api.lambda_api.door import HANDLERS
from impuls.api.lambda_api.operations import OPERATIONS
from tests.helpers import ROOT


def test_every_operation_is_documented_as_what_it_is() -> None:
    doc = (ROOT / "docs" / "lambda-api.md").read_text()
    offered, absent = doc.split("## Not supported", 1)
    absent = absent.split("\n## ", 1)[0]
    offered = offered.split("## Operations", 1)[1]
    for name, _, _ in OPERATIONS:
        word = re.compile(rf"`{name}`")
        if name in HANDLERS:
            assert word.search(offered) and not word.search(absent), name
        else:
            assert word.search(absent) and not word.search(offered), name
    assert set(HANDLERS) <= {name for name, _, _ in OPERATIONS}
