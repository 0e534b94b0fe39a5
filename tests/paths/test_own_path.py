"""The docs' "Write your own path" example (docs/stacks/step.md) runs as written, and a planted twin is found."""

import re
from pathlib import Path

import pytest

from lossaudit import DivergenceError
from lossaudit.paths import PATHS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "stacks" / "step.md"


def example() -> str:
    text = PAGE.read_text()
    section = text[text.index("## Write your own path"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(PATHS, "_items", dict(PATHS._items))  # the example registers "my-loop"


def test_the_readme_example_runs_and_its_loop_matches(registry):
    namespace = {}
    exec(compile(example(), "docs/stacks/step.md", "exec"), namespace)
    report = namespace["report"]  # its assert_clean() passed
    assert report.exit_status == 0 and set(report.cases["path"]) == {"my-loop"}
    assert (report.cases["verdict"] == "match").all()


def test_the_same_loop_dividing_by_each_microbatch_count_is_found(registry):
    code = example().replace("/ total", "/ count_targets(mb.labels, ctx.batch.task)")
    assert code != example()
    with pytest.raises(DivergenceError, match="summed over k microbatches: num_items_in_batch ignored"):
        exec(compile(code, "docs/stacks/step.md", "exec"), {})
