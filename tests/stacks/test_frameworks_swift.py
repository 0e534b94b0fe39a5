"""ms-swift through ``--trainer-class swift.trainers:Seq2SeqTrainer`` (issue 23): its arguments class
(``Seq2SeqTrainingArguments``, the class's own ``args`` annotation), the ``Template`` ms-swift's
own ``get_processor``/``get_template`` build for the model (its collator, its ``compute_sft_loss``),
the audit's rows as its ``encode`` makes them, its dataloader in the layout's order; the stock
trainer measured against the float64 reference, and two planted mean-of-means bugs found with
their cause: a template saying ``model_accepts_loss_kwargs = False`` (ms-swift's own switch, which
its Seq2SeqTrainer copies onto the Trainer) and a subclass dropping ``num_items_in_batch``; and the
trainer ms-swift builds from the user's own ``swift sft`` arguments (``--swift-args``: its
SftArguments, full fine-tune and LoRA against ``--peft``).

Skipped without ms-swift (``pip install 'lossaudit[swift]'``: it needs transformers<5.20 and
trl<1.0, an environment of its own; tests/stacks/test_swift_lean.py builds one in CI). Heavy:
importing ``swift.trainers`` takes ~20 s here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stacks_common import needs

needs("swift")

import torch  # noqa: E402

from lossaudit.audit.config import CheckConfig  # noqa: E402
from lossaudit.core.errors import UsageError  # noqa: E402
from lossaudit.core.grads import trainable  # noqa: E402
from lossaudit.paths.base import AuditContext  # noqa: E402
from lossaudit.paths.trainer import TrainerPath  # noqa: E402
from lossaudit.paths.trainer_class import run_trainer_class  # noqa: E402
from lossaudit.stacks.frameworks import KNOWN, arguments_class, framework_of, required_problem, rows_problem  # noqa: E402
from lossaudit.stacks.swift import SwiftInputs  # noqa: E402
from lossaudit.stacks.trl import check_arguments, resolve_trainer_class, tokenizer  # noqa: E402

from stacks_common import CPU, issue_batch, layout_of, mean_of_means_gradient, reference, rel_err, tiny_llama  # noqa: E402

pytestmark = pytest.mark.heavy
SPEC = "swift.trainers:Seq2SeqTrainer"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cls():
    return resolve_trainer_class(SPEC)


def _ctx(dtype=torch.float32):
    loaded = tiny_llama()
    loaded.model.to(dtype)
    batch = issue_batch(loaded)  # prompts masked on every other sequence
    return AuditContext(loaded.model, batch, reference(loaded.model, batch), trainable(loaded.model), CPU,
                        CheckConfig(model="llama"), loaded)


@pytest.fixture(scope="module")
def ctx():
    return _ctx()


def test_its_arguments_class_is_its_own_and_the_template_is_given(cls):
    from swift.trainers import Seq2SeqTrainingArguments

    assert arguments_class(cls) is Seq2SeqTrainingArguments  # not the mixin's TrainingArguments annotation
    assert framework_of(cls) is KNOWN["swift"]
    assert required_problem(cls) is None and rows_problem(cls, prompt_masking=True) is None
    built = TrainerPath.build(CheckConfig(model="llama", trainer_class=SPEC))  # used to be a usage line
    assert [p.trainer_class for p in built] == [cls]


def test_the_shuffle_it_would_do_is_the_audits_setting(cls):
    with pytest.raises(UsageError, match="train_dataloader_shuffle: set by the audit"):
        check_arguments(cls, {"train_dataloader_shuffle": True})


@pytest.mark.parametrize("padding", ["right", "left"])
def test_ms_swift_builds_the_template_and_its_collator_pads_the_layouts_way(ctx, padding, tmp_path):
    import transformers.trainer as hf_trainer
    from swift.template import Template
    from transformers.trainer_callback import DefaultFlowCallback

    words = tokenizer(ctx.loaded.vocab_size, ctx.batch.pad_id, ctx.loaded.eos_id)
    with SwiftInputs(ctx) as inputs:
        template = inputs.build(layout_of(ctx.batch, 2, padding=padding), words, str(tmp_path), {})["template"]
        assert type(template) is Template and template.mode == "train" and template.padding_side == padding
        assert ctx.model.model_info.model_type == "llama" and ctx.model.model_meta is not None
        rows = inputs.encoded([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}])
        assert [r["labels"] for r in rows] == [[-100, 6, 7], [-100, 9]]  # as its encode masks the first position
        out = template.data_collator(rows)
    pad = ctx.batch.pad_id
    if padding == "right":
        assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, pad]] and out["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    else:
        assert out["input_ids"].tolist() == [[5, 6, 7], [pad, 8, 9]] and out["labels"].tolist() == [[-100, 6, 7], [-100, -100, 9]]
    # what it set on the audited model and on transformers is undone
    assert "model_info" not in vars(ctx.model) and "model_meta" not in vars(ctx.model)
    assert hf_trainer.DEFAULT_CALLBACKS == [DefaultFlowCallback]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_the_stock_trainer_trains_the_token_mean(ctx, cls, padding):
    """Measured on ms-swift 4.6.0 (transformers 5.19.0, torch 2.13.0+cpu), k=4, imbalanced: <= 3e-7.
    Its microbatches are the layout's, in order (its own dataloader shuffles unless told not to)."""
    layout = layout_of(ctx.batch, 4, padding=padding)
    seen = []
    hook = ctx.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        step = run_trainer_class(ctx, layout, cls, user_args={})
    finally:
        hook.remove()
    pad = ctx.batch.pad_id  # the batch's text never holds it
    assert [[row[row != pad].tolist() for row in ids] for ids in seen] == \
        [[ctx.batch.samples[i].input_ids.tolist() for i in group] for group in layout.groups]
    assert rel_err(ctx.reference.grads, step.update.items()) < 1e-5
    assert step.num_items == [ctx.reference.count] * 4 and step.accepts_loss_kwargs is True
    assert step.logged_loss == pytest.approx(ctx.reference.loss, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_template_saying_the_model_takes_no_loss_kwargs_is_the_mean_of_means(cls, monkeypatch, dtype):
    """ms-swift's own switch: a template's ``model_accepts_loss_kwargs = False`` (its Qwen3-TTS
    template says so) goes onto the Trainer, which then gives no num_items_in_batch and divides each
    microbatch's own mean by k. Measured: 0.46 from the token mean at k=4 (float32)."""
    from swift.template import Template

    ctx = _ctx(dtype)
    layout = layout_of(ctx.batch, 4)
    monkeypatch.setattr(Template, "model_accepts_loss_kwargs", False)
    step = run_trainer_class(ctx, layout, cls, user_args={})
    assert step.accepts_loss_kwargs is False and step.num_items == [None] * 4
    assert rel_err(ctx.reference.grads, step.update.items()) > 0.1
    if dtype == torch.float32:
        assert rel_err(dict(mean_of_means_gradient(ctx.model, ctx.batch, layout)), step.update.items()) < 1e-5


def test_a_subclass_dropping_num_items_in_batch_is_k_times_the_mean_of_means(ctx):
    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_classes_swift import MeanOfMeansTrainer

    layout = layout_of(ctx.batch, 4)
    step = run_trainer_class(ctx, layout, MeanOfMeansTrainer, user_args={})
    k_times = {n: 4 * g for n, g in mean_of_means_gradient(ctx.model, ctx.batch, layout)}
    assert rel_err(k_times, step.update.items()) < 1e-5
    assert rel_err(ctx.reference.grads, step.update.items()) > 1.0


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-m", "lossaudit", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


def test_cli_as_a_user_types_it_is_clean_and_the_planted_bug_is_named(tmp_path):
    common = ("--path", "trainer", "--microbatches", "1,2", "--groupings", "imbalanced")
    clean = _cli("check", "llama", "--trainer-class", SPEC, *common, "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-2000:]
    cases = json.loads((tmp_path / "clean" / "report.json").read_text())["cases"]
    assert cases and all(c["verdict"] == "match" for c in cases), cases
    found = _cli("check", "llama", "--trainer-class", "trainer_classes_swift:MeanOfMeansTrainer", *common,
                 "--out", str(tmp_path / "found"))
    assert found.returncode == 1, found.stdout[-3000:] + found.stderr[-2000:]
    assert "each microbatch's token mean, summed over k microbatches: num_items_in_batch ignored" in found.stdout


DATA = ROOT / "tests" / "data"


@pytest.mark.parametrize("loss_type, planted", [(True, False), (True, True), (False, True)],
                         ids=["as-shipped", "planted-with-loss-type", "planted"])
def test_from_the_users_file_ms_swift_builds_the_trainer_and_the_audit_judges_it(ctx, cls, monkeypatch, tmp_path,
                                                                                   loss_type, planted):
    """--swift-args tests/data/swift-full.yaml (tuner_type full, loss_type cross_entropy, its own
    learning rate, warm-up and accumulation, replaced by the audit's step): ms-swift's SftArguments
    build the arguments and the template. The planted template flag (model_accepts_loss_kwargs =
    False) is the mean of means, except under loss_type cross_entropy: a compute_loss_func makes
    transformers 5.19 pass num_items_in_batch anyway, and ms-swift's CustomCrossEntropyLoss divides
    by it (measured: the token mean, 81 counted at each of k=4 microbatches)."""
    from swift.template import Template

    from lossaudit.stacks.swift import SwiftArgs

    text = (DATA / "swift-full.yaml").read_text()
    path = tmp_path / "args.yaml"
    path.write_text(text if loss_type else text.replace("loss_type: cross_entropy\n", ""))
    source = SwiftArgs.read(str(path), None)
    layout = layout_of(ctx.batch, 4)
    if planted:
        monkeypatch.setattr(Template, "model_accepts_loss_kwargs", False)
    step = run_trainer_class(ctx, layout, cls, user_args={}, source=source)
    assert step.accepts_loss_kwargs is (not planted)
    if planted and not loss_type:
        assert step.num_items == [None] * 4
        assert rel_err(dict(mean_of_means_gradient(ctx.model, ctx.batch, layout)), step.update.items()) < 1e-5
    else:
        assert step.num_items == [ctx.reference.count] * 4
        assert rel_err(ctx.reference.grads, step.update.items()) < 1e-5


def test_cli_from_the_users_lora_file(tmp_path):
    """ms-swift's default tuner, LoRA: the audit's --peft adapter must be the one the file builds
    (rank, alpha, the modules ms-swift's own get_target_modules resolves all-linear to)."""
    common = ("check", "llama", "--path", "trainer", "--swift-args", str(DATA / "swift-lora.yaml"), "--peft", "lora",
              "--microbatches", "1,2", "--groupings", "imbalanced")
    same = _cli(*common, "--peft-arg", "r=8", "--peft-arg", "lora_alpha=32", "--peft-arg", "target_modules=all-linear",
                "--out", str(tmp_path / "same"))
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-2000:]
    cases = json.loads((tmp_path / "same" / "report.json").read_text())["cases"]
    assert cases and all(c["verdict"] == "match" for c in cases)
    assert "gradient_accumulation_steps (8 -> k)" in cases[0]["swift_args_owned"]
    other = _cli(*common, "--out", str(tmp_path / "other"))
    assert other.returncode == 2, other.stdout[-3000:] + other.stderr[-2000:]
    line = [x for x in other.stderr.splitlines() if x.startswith("lossaudit")]
    assert len(line) == 1 and "its LoRA differs from the audit's --peft adapter (lora_alpha: file 32, --peft 8" in line[0]


def test_in_bfloat16_the_stock_trainer_is_clean_and_a_1pct_reweighting_is_found(tmp_path):
    """The bf16 bar through ms-swift's trainer: each microbatch's weight resolved from its own
    backward, so 1 % of the weight moved between microbatches is found on every layout with k > 1
    though the whole gradient is within the bf16 tolerance (measured on 4.6.0: 1.2e-02 and 9.0e-03
    against 1.9e-02; weights 1.01 and 0.99 against 0.004), and the stock trainer is clean."""
    common = ("--path", "trainer", "--dtype", "bfloat16", "--microbatches", "1,2,4", "--paddings", "right")
    clean = _cli("check", "llama", "--trainer-class", SPEC, *common, "--out", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-2000:]
    found = _cli("check", "llama", "--trainer-class", "trainer_classes_swift:Reweighted1pctTrainer", *common,
                 "--out", str(tmp_path / "found"))
    assert found.returncode == 1, found.stdout[-3000:] + found.stderr[-2000:]
    cases = json.loads((tmp_path / "found" / "report.json").read_text())["cases"]
    assert {c["verdict"] for c in cases if c["microbatches"] > 1} == {"diverge"}, cases
    assert {c["verdict"] for c in cases if c["microbatches"] == 1} == {"match"}, cases
    assert all("max |microbatch weight - 1|" in c["detail"] for c in cases if c["microbatches"] > 1)
