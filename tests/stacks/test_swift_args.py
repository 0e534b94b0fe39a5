"""--swift-args FILE read and checked before any model is built (no ms-swift needed): what lossaudit
cannot audit from a `swift sft` arguments file is one usage line each, every problem at once; the
settings the audit owns are named when the file sets them. Auditing the trainer ms-swift builds
from the file: tests/stacks/test_frameworks_swift.py."""

from pathlib import Path

import pytest

from lossaudit.audit.config import CheckConfig
from lossaudit.core.errors import UsageError
from lossaudit.stacks.swift import OWNED, SwiftArgs, checked

DATA = Path(__file__).resolve().parents[1] / "data"


def _problems(path, peft=None):
    with pytest.raises(UsageError) as caught:
        SwiftArgs.read(str(path), peft)
    return caught.value.problems


def test_the_examples_read_and_name_what_the_audit_owns():
    full = SwiftArgs.read(str(DATA / "swift-full.yaml"), None)
    owned = full.owned_in()
    assert "gradient_accumulation_steps (16 -> k)" in owned and "learning_rate (1e-05 -> 1 (SGD: the update is the gradient))" in owned
    assert "warmup_ratio (0.05 -> 0)" in owned and not any(o.startswith("loss_type") for o in owned)
    assert all(o.split(" ")[0] in OWNED for o in owned)
    assert SwiftArgs.read(str(DATA / "swift-lora.yaml"), "lora").values["lora_rank"] == 8


@pytest.mark.parametrize("text, needle", [
    ("rlhf_type: dpo\ntuner_type: full\n", "rlhf_type: 'dpo': a preference or reward objective"),
    ("packing: true\ntuner_type: full\n", "packing: True: its PackingDataset chooses"),
    ("task_type: seq_cls\ntuner_type: full\n", "task_type: 'seq_cls': lossaudit audits causal_lm"),
    ("loss_type: infonce\ntuner_type: full\n", "loss_type: 'infonce' is not a token mean"),
    ("enable_dft_loss: true\ntuner_type: full\n", "enable_dft_loss: True: DFT's"),
    ("tuner_type: adalora\n", "tuner_type: 'adalora': only full and lora"),
    ("learning_rate: 1.0e-4\n", "tuner_type: lora (ms-swift's default is lora) but --peft None"),
    ("[1, 2]\n", "expected a mapping of ms-swift arguments"),
    ("a: [1,\n", "neither JSON nor YAML"),
], ids=["rlhf", "packing", "task", "loss", "dft", "tuner", "default-lora", "list", "broken"])
def test_what_cannot_be_audited_is_one_line_each(tmp_path, text, needle):
    path = tmp_path / "args.yaml"
    path.write_text(text)
    problems = _problems(path)
    assert len(problems) == 1 and needle in problems[0] and "\n" not in problems[0], problems


def test_every_problem_at_once_and_json_is_read(tmp_path):
    path = tmp_path / "args.json"
    path.write_text('{"rlhf_type": "dpo", "packing": true, "tuner_type": "full"}')
    assert len(_problems(path)) == 2
    path.write_text('{"tuner_type": "full", "learning_rate": 0.001}')
    assert SwiftArgs.read(str(path), None).owned_in() == ["learning_rate (0.001 -> 1 (SGD: the update is the gradient))"]


def test_a_missing_file_and_the_options_it_replaces(tmp_path):
    assert "no such file" in _problems(tmp_path / "nope.yaml")[0]
    with pytest.raises(UsageError) as caught:  # checked with every other problem, before any model is built
        CheckConfig(model="llama", swift_args=str(DATA / "swift-full.yaml"), trainer_args=(("bf16", "false"),))
    assert "--swift-args with --trainer-arg: the file is the trainer's arguments; set them there" in caught.value.problems
    config = CheckConfig(model="llama", paths=("trainer",), swift_args=str(DATA / "swift-full.yaml"))
    assert checked(config).values["tuner_type"] == "full"
