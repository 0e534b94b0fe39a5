"""Help text a user reads: `check --help` names every registered path; the gate's growth
options say what their default is and how to turn them off."""

import contextlib
import io

import pytest

from lossaudit.cli.app import main
from lossaudit.paths import PATHS


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(out.getvalue().split())  # argparse wraps lines where it likes


def test_check_help_lists_every_registered_path():
    text = _help("check")
    path_help = text.split("--path NAME", 2)[2].split("--microbatches")[0]
    assert PATHS.names() and all(name in path_help for name in PATHS.names())
    assert "one of: " + ", ".join(PATHS.names()) in path_help


@pytest.mark.parametrize("command", ["check", "compare"])
def test_growth_help_says_the_default_is_10x_and_how_to_turn_it_off(command):
    text = _help(command)
    for option in ("--max-grad-growth", "--max-loss-growth"):
        option_help = text.split(f"{option} VALUE", 2)[-1].split(" --")[0]
        assert "(default 10x; the value off disables the check)" in option_help
