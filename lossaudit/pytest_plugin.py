"""pytest plugin (entry point ``pytest11``): the ``lossaudit`` fixture, a marker, and options.

    def test_my_stack(lossaudit):
        lossaudit.check("llama", path=["trainer"], microbatches=[4]).assert_clean()

    @pytest.mark.lossaudit(model="llama", microbatches=[2, 4])
    def test_llama_accumulates():      # a marked test that runs no audit itself runs the declared one
        ...

Options: every setting of ``lossaudit check`` as ``--lossaudit-...`` (``--lossaudit-model``, the
model of every audit that names none; ``--lossaudit-seed``, ``--lossaudit-path``, ...: generated
from the option table of ``lossaudit.audit.options``), ``--lossaudit-baseline``
(compare every audit with this report.json; a regression fails the test) and the gate's
thresholds as ``--lossaudit-max-grad-growth`` and so on (the same definitions as the CLI's).
Loaded when pytest starts, in every project that has lossaudit installed: nothing here imports
torch, transformers or pandas; the fixture and hooks import them when an audit runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .core.errors import UsageError
from .gate.thresholds import Gate, add_pytest_options
from .audit.options import add_arguments as add_config_options
from .audit.options import values_from

MARKER = "lossaudit"
PREFIX = "lossaudit-"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lossaudit", "loss-reduction audits (lossaudit)")
    # every setting of an audit, from the option table the CLI is generated from: the default of
    # every audit in the session (a marker's options and check()'s keywords override it)
    add_config_options(group, prefix=PREFIX, unset_default=True)
    group.addoption("--lossaudit-baseline", metavar="FILE", type=Path, default=None,
                    help="compare every audit with this report.json; a regression fails the test")
    add_pytest_options(group)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(model=None, **options): declare an audit (options as lossaudit.check takes them); "
        "the lossaudit fixture uses them as defaults, and a marked test that runs no audit runs this one")
    baseline = config.getoption("lossaudit_baseline")
    if baseline is not None:
        from .report.report import Report

        try:  # a missing or broken baseline stops the session before any test runs
            config.stash[BASELINE] = Report.load(baseline)
        except UsageError as exc:
            raise pytest.UsageError(f"--lossaudit-baseline: {exc}") from None


BASELINE = pytest.StashKey()


class Auditor:
    """What the ``lossaudit`` fixture gives a test: ``check(model, **options)``."""

    def __init__(self, config: pytest.Config, node: pytest.Item):
        self._config = config
        marker = node.get_closest_marker(MARKER)
        self.declared = dict(marker.kwargs) if marker else {}
        if marker and marker.args:
            self.declared.setdefault("model", marker.args[0])
        self.audits = 0

    def gate(self) -> Gate:
        return Gate.from_values({key[len("lossaudit_"):]: value for key, value in vars(self._config.option).items()
                                 if key.startswith("lossaudit_")})

    def check(self, model: str | None = None, *, baseline: str | Path | None = None, **options):
        """Audit ``model`` (else the marker's, else --lossaudit-model) with the marker's options
        overridden by ``options``; compare with ``baseline`` (else --lossaudit-baseline).
        Returns a :class:`lossaudit.gate.baseline.GatedReport`: call ``.assert_clean()`` on it.
        Bad options (an unknown model, path, ...) fail the test with lossaudit's one line."""
        __tracebackhide__ = True
        try:
            return self._check(model, baseline, options)
        except UsageError as exc:
            problem = str(exc)
        pytest.fail(f"lossaudit: {problem}", pytrace=False)  # outside the except: no chained traceback

    def session_options(self) -> dict:
        """The audit settings given on pytest's command line (--lossaudit-seed 3, ...)."""
        return values_from(vars(self._config.option), PREFIX)

    def _check(self, model, baseline, options):
        import lossaudit
        from .gate.baseline import GatedReport, compare
        from .report.report import Report

        merged = {**self.session_options(), **self.declared, **options}
        if "path" in merged:
            merged["paths"] = merged.pop("path")
        model = model or merged.pop("model", None)
        merged.pop("model", None)
        if not model:
            raise UsageError("no model to audit: pass one to lossaudit.check(), mark the test with "
                             "@pytest.mark.lossaudit(model=...), or run pytest with --lossaudit-model")
        self.audits += 1
        report = lossaudit.check(model, **merged)
        old = Report.load(baseline) if baseline is not None else self._config.stash.get(BASELINE, None)
        if old is None:
            return GatedReport(report)
        name = str(baseline or self._config.getoption("lossaudit_baseline"))
        return GatedReport(report, compare(old, report, self.gate(), old_name=name, new_name=f"{model} (this test)"))


@pytest.fixture
def lossaudit(request: pytest.FixtureRequest) -> Auditor:
    return Auditor(request.config, request.node)


@pytest.hookimpl(trylast=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """After the body of a marked test passed (trylast: pytest's own call runs first and a
    failing body stops here): if it ran no audit itself, run the declared one."""
    __tracebackhide__ = True
    if item.get_closest_marker(MARKER) is None:
        return
    auditor = getattr(item, "funcargs", {}).get("lossaudit")
    if auditor is None or auditor.audits == 0:
        (auditor or Auditor(item.config, item)).check().assert_clean()
