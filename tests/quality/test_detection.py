"""Detection power, as a test tier (like Hypothesis's quality tests): every planted bug of
``bugs.PLANTS`` must be found in float32 and bfloat16, and its correct twin must pass clean.

A combination the current verdicts miss is in ``bugs.MISSED`` and runs as xfail(strict=True):
when it starts being found the suite fails until it is taken off the list, so "found" never
silently turns back into "missed"."""

import pytest

from quality.bugs import MISSED, PLANTS, audit, is_found


def _tier(plant) -> list:
    """The default tier audits the nanoGPT shape in both dtypes; the heavy tier every plant."""
    return [] if plant.name == "mean-of-means" else [pytest.mark.heavy]


def _table():
    for plant in PLANTS:
        for dtype in plant.dtypes:
            reason = MISSED.get((plant.name, dtype))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(plant, dtype, id=f"{plant.name}-{dtype}", marks=marks + _tier(plant))


@pytest.mark.parametrize("plant, dtype", _table())
def test_planted_bug_is_found(plant, dtype):
    report = audit(plant, dtype)
    assert is_found(report), report.cases[["path", "reduction", "microbatches", "padding", "loss_rel_err",
                                           "grad_rel_err", "verdict", "detail"]].to_string()


@pytest.mark.parametrize("plant, dtype", [pytest.param(p, d, id=f"{p.name}-{d}", marks=_tier(p)) for p in PLANTS
                                            for d in p.dtypes])
def test_correct_twin_passes_clean(plant, dtype):
    report = audit(plant, dtype, twin=True)
    assert report.exit_status == 0, report.findings[["path", "reduction", "microbatches", "padding",
                                                     "grad_rel_err", "detail"]].to_string()
    assert len(report.cases) >= 2  # k=1 and k=4 (more on two paddings) were audited
