"""Isolated environments: the key of the pins, what is pinned, what counts as built."""

import json

import pytest
from hypothesis import given, strategies as st

from lossaudit.releases import environments as envs
from lossaudit.releases import pip_text
from lossaudit.releases.check_runs import split_argv
from lossaudit.core.errors import UsageError

BASE = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "tokenizers": "0.23.3", "numpy": "2.4.6"}


def spec(pins, base=BASE, source="/src/lossaudit"):
    return envs.Spec.make(pins, dict(base), source)


def test_parse_pin_takes_exact_pins_only():
    assert envs.parse_pin("Transformers==4.46.0") == ("transformers", "4.46.0")
    assert envs.parse_pin(" typing_extensions==4.16.0 ") == ("typing-extensions", "4.16.0")
    for bad in ("transformers", "transformers>=4.46", "transformers==", "==4.46.0", "trans formers==1", "x==1 2"):
        with pytest.raises(UsageError, match="exact pin"):
            envs.parse_pin(bad)


def test_the_key_names_the_pins_the_base_the_interpreter_and_the_source():
    a = spec({"transformers": "4.46.0"})
    assert a.key == spec({"Transformers": "4.46.0"}).key  # one distribution, however spelled
    assert a.key == spec({"transformers": "4.46.0"}, dict(reversed(list(BASE.items())))).key  # order is no part
    others = [spec({"transformers": "4.46.1"}), spec({"transformers": "4.46.0", "trl": "0.12.0"}),
              spec({"transformers": "4.46.0"}, {**BASE, "numpy": "2.4.5"}),
              spec({"transformers": "4.46.0"}, source="/elsewhere")]
    assert len({a.key, *(o.key for o in others)}) == 1 + len(others)
    assert a.name == f"transformers-4.46.0-{a.key}" and len(a.key) == 16


@given(st.dictionaries(st.sampled_from(["transformers", "trl", "peft", "tokenizers"]),
                       st.from_regex(r"[0-9]{1,2}\.[0-9]{1,2}\.[0-9]", fullmatch=True), max_size=3),
       st.sets(st.sampled_from(sorted(BASE))))
def test_constraints_pin_everything_else_at_its_current_version(pins, lifted):
    s = spec(pins)
    constraints = dict(line.split("==") for line in s.constraints(lifted))
    requirements = s.requirements()
    assert requirements[:len(pins)] == [f"{n}=={v}" for n, v in sorted(pins.items())]  # the pins first, exact
    for name, version in BASE.items():
        if name not in pins:
            assert constraints.get(name) == (None if name in lifted else version)
            assert name in requirements  # installed, lifted or not
        else:
            assert name not in constraints and name not in requirements  # the pin replaces it
    assert len(requirements) == len(set(BASE) | set(pins))


def test_pip_and_lossaudit_itself_are_never_pinned():
    current = envs.current_distributions()
    assert "pip" not in current and "lossaudit" not in current
    assert current["torch"].startswith("2.")  # the CPU wheel's exact version, +cpu included


def test_a_half_built_environment_never_counts(tmp_path):
    s = spec({"transformers": "4.46.0"})
    folder = tmp_path / s.name
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").write_text("")
    assert envs.cached(s, tmp_path) is None  # no manifest: the build stopped half-way
    (folder / envs.MANIFEST).write_text(json.dumps({"key": "0" * 16}))
    assert envs.cached(s, tmp_path) is None  # a manifest of other pins
    (folder / envs.MANIFEST).write_text(json.dumps({"key": s.key, "lifted_versions": {"tokenizers": "0.20.3"}}))
    env = envs.cached(s, tmp_path)
    assert env.path == folder and not env.created and env.manifest["lifted_versions"] == {"tokenizers": "0.20.3"}


PIP_CONFLICT = """\
ERROR: Cannot install tokenizers and transformers==4.46.0 because these package versions have conflicting dependencies.

The conflict is caused by:
    The user requested tokenizers
    transformers 4.46.0 depends on tokenizers<0.21 and >=0.20
    The user requested (constraint) tokenizers==0.23.3
    The user requested (constraint) Huggingface_Hub==2.4.0
    The user requested (constraint) transformers==4.46.0

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_a_conflict_names_the_constraints_to_lift_never_a_pin():
    assert pip_text.conflicting_constraints(PIP_CONFLICT, {"transformers"}) == {"tokenizers", "huggingface-hub"}
    assert pip_text.conflicting_constraints("ERROR: No matching distribution found for x==9", set()) == set()


def test_the_reason_is_the_installers_one_telling_line():
    missing = ("Looking in indexes: https://pypi.org/simple\nERROR: Could not find a version that satisfies the "
               "requirement transformers==99.0.0 (from versions: 0.1, 2.0.0, 4.46.0)\n"
               "ERROR: No matching distribution found for transformers==99.0.0\n")
    assert pip_text.reason_line(missing) == "No matching distribution found for transformers==99.0.0"
    # a conflict: pip's own explanation, every line of it, not only "conflicting dependencies"
    assert pip_text.reason_line(PIP_CONFLICT) == (
        "the conflict is caused by: The user requested tokenizers; transformers 4.46.0 depends on tokenizers<0.21 "
        "and >=0.20; The user requested (constraint) tokenizers==0.23.3; The user requested (constraint) "
        "Huggingface_Hub==2.4.0; The user requested (constraint) transformers==4.46.0")


def test_own_options_are_taken_out_and_checks_forwarded_in_order():
    own = {"--to": True, "--overwrite": False, "--max-grad-growth": True}
    argv = ["--path", "model", "--to", "transformers==4.46.0", "--microbatches=2", "--overwrite",
            "--max-grad-growth=5x", "--path", "trainer"]
    mine, rest = split_argv(argv, own)
    assert mine == ["--to", "transformers==4.46.0", "--overwrite", "--max-grad-growth=5x"]
    assert rest == ["--path", "model", "--microbatches=2", "--path", "trainer"]


def test_the_default_cache_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert envs.default_cache() == tmp_path / "lossaudit" / "envs"


def test_uvs_conflict_names_the_constraint_too():
    uv = ("  × No solution found when resolving dependencies:\n  ╰─▶ Because transformers==4.46.0 depends on "
          "tokenizers>=0.20,<0.21 and you require tokenizers==0.23.3, we can conclude that you require "
          "transformers!=4.46.0.\n      And because you require transformers==4.46.0, your requirements are unsatisfiable.")
    assert pip_text.conflicting_constraints(uv, {"transformers"}) == {"tokenizers"}


PIP_DEPENDER_CONFLICT = """\
The conflict is caused by:
    The user requested huggingface-hub
    accelerate 1.16.0 depends on huggingface_hub>=0.21.0
    kernels 0.19.1 depends on huggingface-hub>=1.32.0
    tokenizers 0.23.3 depends on huggingface-hub<3.0 and >=0.16.4
    transformers 4.46.0 depends on huggingface-hub<1.0 and >=0.23.2
"""


def test_a_constrained_distribution_that_needs_what_the_pin_excludes_is_lifted_alone():
    # kernels admits no huggingface-hub that transformers 4.46 admits; accelerate and tokenizers do
    assert pip_text.conflicting_constraints(PIP_DEPENDER_CONFLICT, {"transformers"}) == {"kernels"}
    assert pip_text.conflicting_constraints(PIP_DEPENDER_CONFLICT, set()) == set()  # no pin: nothing to favour
