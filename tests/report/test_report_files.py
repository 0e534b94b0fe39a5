"""Writing a report: all files or none, never half a file, with the permissions of the umask."""

import errno
import os
import stat

import pytest

from lossaudit.report import render
from lossaudit.core.errors import EnvironmentProblem, UsageError
from lossaudit.report.outdir import write_dir
from lossaudit.report.render import write_atomic, write_files, write_report

OLD = {"report.json": "old json", "cases.csv": "old csv", "report.md": "old md"}


@pytest.fixture
def old_report(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    for name, text in OLD.items():
        (out / name).write_text(text)
    return out


def contents(out):
    return {p.name: p.read_text() for p in sorted(out.iterdir())}


def renderers(fail_at=None, exc=None):
    def make(name):
        def render_one(subject):
            if name == fail_at:
                raise exc
            return f"new {name} of {subject}"
        return render_one
    return {name: make(name) for name in OLD}


def test_all_files_are_replaced_together(old_report):
    written = write_files(old_report, renderers(), "x", "report")
    assert [p.name for p in written] == list(OLD)
    assert contents(old_report) == {name: f"new {name} of x" for name in sorted(OLD)}


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), ValueError("cannot render")])
def test_a_failure_midway_leaves_the_old_report_whole_and_no_temporary_file(old_report, exc):
    with pytest.raises((EnvironmentProblem, ValueError)):  # a full disk is the environment: exit 3
        write_files(old_report, renderers(fail_at="report.md", exc=exc), "x", "report")
    assert contents(old_report) == dict(sorted(OLD.items()))


def test_a_failure_while_staging_leaves_the_old_report_whole(old_report, monkeypatch):
    real, staged = render._stage, []

    def stage_then_fail(path, text):
        if len(staged) == 2:
            raise OSError(errno.EIO, "Input/output error")
        staged.append(real(path, text))
        return staged[-1]

    monkeypatch.setattr(render, "_stage", stage_then_fail)
    with pytest.raises(EnvironmentProblem, match="cannot write the report to .*Input/output error"):
        write_files(old_report, renderers(), "x", "report")
    assert contents(old_report) == dict(sorted(OLD.items()))
    assert staged and not any(p.exists() for p in staged)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_files(tmp_path / "r", renderers(), "x", "report")
        write_atomic(tmp_path / "single.json", "{}")
    finally:
        os.umask(previous)
    for path in [*(tmp_path / "r").iterdir(), tmp_path / "single.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_write_report_writes_every_rendering(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "RENDERERS", renderers())
    assert [p.name for p in write_report("a report", tmp_path / "r")] == list(OLD)
    assert (tmp_path / "r" / "report.json").read_text() == "new report.json of a report"


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), ValueError("cannot render")])
def test_a_report_directory_failing_midway_keeps_the_old_one_and_stages_nothing(old_report, exc):
    with pytest.raises((EnvironmentProblem, ValueError)):
        write_dir(old_report, renderers(fail_at="report.md", exc=exc), "x", "report")
    assert contents(old_report) == dict(sorted(OLD.items()))
    assert sorted(p.name for p in old_report.parent.iterdir()) == ["r"]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_report_directory_is_replaced_as_a_whole(old_report, monkeypatch, exchange):
    from lossaudit.report import outdir

    (old_report / "report.html").write_text("old html, not rendered this time")
    if not exchange:  # a kernel or file system without renameat2(RENAME_EXCHANGE): two renames
        monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    written = write_dir(old_report, renderers(), "x", "report")
    assert [p.name for p in written] == list(OLD)
    assert contents(old_report) == {name: f"new {name} of x" for name in sorted(OLD)}  # no file of the old run
    assert sorted(p.name for p in old_report.parent.iterdir()) == ["r"]


def test_a_write_refused_for_permission_names_it(tmp_path):
    from lossaudit.report.outdir import write_error

    error = write_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "r")), tmp_path / "r", "report")
    assert isinstance(error, UsageError) and "permission denied" in str(error)
