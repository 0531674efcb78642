"""Behaviour pins: seeded default, IW-SVI and gap-decomposition runs on digits reproduce the metrics recorded before
the issue-15 refactor (``tests/regression_runs.py``) to float tolerance."""
import json
import math

import pytest

from tests.regression_runs import PINS, RUNS, run_one


@pytest.mark.parametrize("name", list(RUNS))
def test_seeded_run_reproduces_pinned_metrics(name, tmp_path):
    pinned = json.loads(PINS.read_text())[name]
    got = run_one(name, tmp_path)
    missing = sorted(set(pinned) - set(got))
    assert not missing, f"metrics no longer reported: {missing}"
    off = {k: (got[k], v) for k, v in pinned.items()
           if not (isinstance(v, float) and math.isfinite(v) and math.isclose(got[k], v, rel_tol=1e-5, abs_tol=1e-6))
           and got[k] != v}
    assert not off, f"{len(off)} of {len(pinned)} metrics moved (got, pinned): {off}"
