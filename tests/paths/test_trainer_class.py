"""--trainer-class for any transformers.Trainer subclass (issues 23 and 26 item 3): the arguments
class found from the class itself, the collator its own builder would give it (the stock
Trainer: one that pads labels with -100), the step measured against the exact reference and the
stock Trainer path, a planted bug found, and a class whose arguments cannot be told refused in
one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stacks_common import needs

needs("datasets")

from transformers import Trainer, TrainingArguments  # noqa: E402

from lossaudit.audit.config import CheckConfig  # noqa: E402
from lossaudit.core.errors import UsageError  # noqa: E402
from lossaudit.core.grads import trainable  # noqa: E402
from lossaudit.models.compat import trainer_accumulates_right  # noqa: E402
from lossaudit.paths.base import AuditContext  # noqa: E402
from lossaudit.paths.trainer_class import run_trainer_class  # noqa: E402
from lossaudit.paths.trainer_step import trainer_step  # noqa: E402
from lossaudit.stacks.frameworks import (PLAIN, arguments_class, collator, framework_of, required_problem,
                                         rows_problem)  # noqa: E402
from lossaudit.stacks.trl import resolve_trainer_class, tokenizer  # noqa: E402

from stacks_common import CPU, issue_batch, layout_of, reference, rel_err, tiny_llama  # noqa: E402
import trainer_classes as tc  # noqa: E402
import trainer_classes_own as own  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RIGHT = pytest.mark.skipif(not trainer_accumulates_right(), reason="the installed Trainer's step is known wrong")


@pytest.fixture(scope="module")
def ctx():
    loaded = tiny_llama()
    batch = issue_batch(loaded)  # prompts masked on every other sequence: rows carry labels
    ref = reference(loaded.model, batch)
    return AuditContext(loaded.model, batch, ref, trainable(loaded.model), CPU, CheckConfig(model="llama"), loaded)


@pytest.mark.parametrize("cls, expected", [
    (Trainer, TrainingArguments), (tc.PlainTrainer, TrainingArguments), (tc.PassThroughTrainer, TrainingArguments),
    (own.AnnotatedTrainer, own.OwnArguments), (own.StatedTrainer, own.OwnArguments)],
    ids=["Trainer", "plain", "pass-through", "annotated", "class-annotation"])
def test_the_arguments_class_is_found_from_the_class(cls, expected):
    assert arguments_class(cls) is expected
    assert framework_of(cls) is PLAIN and rows_problem(cls, prompt_masking=True) is None


@pytest.mark.parametrize("cls, needle", [(tc.NoArgsTrainer, "NoArgsTrainer.__init__ takes no args"),
                                         (own.UnannotatedTrainer, "holds OtherArguments, OwnArguments")])
def test_a_class_whose_arguments_cannot_be_told_is_one_usage_error(cls, needle):
    with pytest.raises(UsageError, match="cannot tell its arguments class") as caught:
        arguments_class(cls)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_a_class_needing_what_the_audit_cannot_give_is_named():
    assert "NeedsMoreTrainer.__init__ requires finetuning_args" in required_problem(tc.NeedsMoreTrainer)
    assert "TemplateMixin.__init__ requires template, which" in required_problem(tc.MixinTrainer)  # a mixin too
    assert all(required_problem(c) is None for c in (Trainer, tc.PlainTrainer, tc.PassThroughTrainer,
                                                     own.AnnotatedTrainer))


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("swift") is not None, reason="ms-swift is installed")
def test_ms_swifts_trainer_without_ms_swift_names_the_extra():
    """Where it is installed, tests/stacks/test_frameworks_swift.py audits it (tests/stacks/test_swift_lean.py in CI)."""
    from lossaudit.core.errors import EnvironmentProblem

    with pytest.raises(EnvironmentProblem, match=r"pip install 'lossaudit\[swift\]'"):
        resolve_trainer_class("swift.trainers:Seq2SeqTrainer")


def test_a_plain_subclass_gets_a_collator_that_pads_labels_with_minus_100():
    made = collator(tc.PlainTrainer, tokenizer(16, 0, 1))
    out = made([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}])
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@RIGHT
@pytest.mark.parametrize("spec", ["transformers:Trainer", "trainer_classes:PassThroughTrainer"])
def test_the_stock_trainer_and_a_subclass_match_the_token_mean_and_the_stock_path(ctx, spec):
    """Measured: transformers 5.25.0, <= 3e-7 against the float64 reference at k=4 on masked prompts."""
    layout = layout_of(ctx.batch, 4)
    step = run_trainer_class(ctx, layout, resolve_trainer_class(spec), user_args={})
    stock = trainer_step(ctx, layout, user_args={})
    assert rel_err(ctx.reference.grads, step.update.items()) < 1e-5
    assert rel_err(stock.update, step.update.items()) < 1e-6
    assert step.logged_loss == pytest.approx(ctx.reference.loss, rel=1e-5)
    assert step.num_items == [ctx.reference.count] * 4


def test_a_planted_bug_in_a_plain_subclass_is_found(ctx):
    step = run_trainer_class(ctx, layout_of(ctx.batch, 4), tc.OwnCountTrainer, user_args={})
    assert rel_err(ctx.reference.grads, step.update.items()) > 0.1


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-m", "lossaudit", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


@pytest.mark.heavy  # ~55 s here: a CLI process importing transformers and building the model
def test_cli_a_class_whose_arguments_cannot_be_told_is_one_line_exit_2(tmp_path):
    result = _cli("check", "llama", "--path", "trainer", "--trainer-class", "trainer_classes:NoArgsTrainer",
                  "--microbatches", "2", "--out", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr
    # where torchao is installed (axolotl's environment) it prints at import, before lossaudit runs: ours is the last line
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("lossaudit")]
    assert len(lines) == 1 and "cannot tell its arguments class" in lines[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.heavy
@RIGHT
def test_cli_the_stock_trainer_class_is_clean(tmp_path):
    """Issue 26 item 3: this errored on every case ("Unable to create tensor ... labels")."""
    result = _cli("check", "llama", "--path", "trainer", "--trainer-class", "transformers:Trainer",
                  "--microbatches", "2", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["cases"] and all(case["verdict"] == "match" for case in report["cases"]), report["cases"]
