"""The other heads (seq2seq, token and sequence classification): the reference against a
plain per-sample loop in float64, the reductions' identities on any layout, and the model
path on tiny real transformers models."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lossaudit
from lossaudit.core.batch import BatchSpec, make_batch
from lossaudit.core.forward import forward
from lossaudit.audit.harness import batch_for
from lossaudit.core.layouts import GROUPINGS, PADDINGS, Layout, collate, group
from lossaudit.models.loading import load_model
from lossaudit.paths.model import ModelPath
from lossaudit.paths.reduction import ReductionPath
from lossaudit.core.reductions import REDUCTIONS
from lossaudit.core.tokens import IGNORE_INDEX

from judged import judged
from toy import ToyHeads, toy_context, toy_task_batch

HEADS = ("seq2seq", "token-classification", "sequence-classification")


def sample_logits(model, sample):
    """One sample, unpadded, batch of one, its inputs built here and not by lossaudit."""
    ids = sample.input_ids[None]
    if sample.decoder_input_ids is not None:
        return model(input_ids=ids, decoder_input_ids=sample.decoder_input_ids[None]).logits[0]
    return model(input_ids=ids).logits[0]


def plain_loop_loss(model, batch):
    """The per-target mean, one target at a time: -log softmax(row)[label] summed over every
    scored label of every sample, over their count (per token, or per sequence)."""
    total, count = 0.0, 0
    for sample in batch.samples:
        logits = sample_logits(model, sample).double()
        rows = logits.reshape(1, -1) if batch.task == "sequence-classification" else logits
        for row, label in zip(rows, sample.labels.reshape(-1).tolist()):
            if label != IGNORE_INDEX:
                total = total + torch.logsumexp(row, 0) - row[label]
                count += 1
    return total / count, count


def assert_reference_is_the_plain_loop(model, batch, rtol):
    ctx = toy_context(batch, model)
    loss, count = plain_loop_loss(model, batch)
    assert ctx.reference.count == count == sum(batch.targets)
    assert math.isclose(ctx.reference.loss, float(loss.detach()), rel_tol=rtol)
    grads = torch.autograd.grad(loss, [p for _, p in ctx.params], allow_unused=True)
    diff2 = ref2 = 0.0  # over the whole gradient: some tensors' true gradient is 0 (attention key biases)
    for (name, _), g in zip(ctx.params, grads):
        want = torch.zeros_like(ctx.reference.grads[name]) if g is None else g
        diff2 += float((ctx.reference.grads[name] - want).square().sum())
        ref2 += float(want.square().sum())
    assert math.sqrt(diff2 / ref2) <= rtol


@pytest.mark.parametrize("task", HEADS)
def test_toy_reference_is_the_plain_loop(task):
    batch = toy_task_batch(task, 6, empty=1)
    assert_reference_is_the_plain_loop(ToyHeads(task), batch, 1e-12)


@pytest.mark.parametrize("name, task", [("t5", "seq2seq"), ("bert", "token-classification"),
                                        ("llama", "sequence-classification")])
def test_real_model_reference_is_the_plain_loop(name, task):
    """On real tiny models in float64: the collated, padded batch through lossaudit's inputs
    (decoder inputs, masks, position ids) scores exactly what each sample scores alone."""
    loaded = load_model(name, task=task)
    model = loaded.model.double().train()
    batch = make_batch(BatchSpec(5, 12, 3, True, 1, 0), vocab_size=loaded.vocab_size, pad_id=loaded.pad_id,
                       task=task, num_labels=loaded.num_labels, decoder_start_id=loaded.decoder_start_id)
    assert_reference_is_the_plain_loop(model, batch, 1e-9)


def test_task_batches_hold_what_each_head_is_scored_on():
    s2s = toy_task_batch("seq2seq", 4)
    for s in s2s.samples:  # the start token, then the targets shifted right
        assert s.decoder_input_ids[0] == 1 and s.decoder_input_ids.shape == s.labels.shape
    assert s2s.samples[0].labels.ne(IGNORE_INDEX).all()  # every decoder token of an unmasked sample is scored
    tok = toy_task_batch("token-classification", 4)
    assert all(s.labels[0] == IGNORE_INDEX for s in tok.samples)  # the leading special token
    assert max(int(s.labels.max()) for s in tok.samples) < 3
    seq = toy_task_batch("sequence-classification", 4, empty=1)
    assert [s.labels.dim() for s in seq.samples] == [0] * 4 and seq.targets == [1, 1, 1, 0]
    mb = collate(seq, (0, 3), "left")
    assert mb.labels.shape == (2,) and mb.labels[1] == IGNORE_INDEX


@st.composite
def task_steps(draw):
    n = draw(st.integers(1, 8))
    return (draw(st.sampled_from(HEADS)), n, draw(st.integers(1, n)), draw(st.sampled_from(PADDINGS)),
            draw(st.sampled_from(GROUPINGS)), draw(st.integers(0, 10_000)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task_steps())
def test_num_items_equals_the_full_batch_mean_for_every_head(step):
    task, n, k, padding, grouping, seed = step
    batch = toy_task_batch(task, n, seed=seed)
    ctx = toy_context(batch, ToyHeads(task))
    layout = Layout(k, grouping, padding, group(batch, k, grouping))
    paths = [ReductionPath.of(REDUCTIONS.get("num_items")), ModelPath()]  # the toy honours num_items_in_batch
    for m, verdict, _ in judged(ctx, layout, paths):
        assert abs(m.loss - ctx.reference.loss) <= 1e-12 * abs(ctx.reference.loss), m.label
        assert m.grads.rel_err <= 1e-12 and verdict == "match", m.label


def num_items_handling(name, task):
    """What the installed library's head does with ``num_items_in_batch``, asked directly:
    'honoured' (sum / N), 'ignored' (accepted, plain mean) or 'rejected' (TypeError)."""
    loaded = load_model(name, task=task)
    batch = batch_for(loaded, BatchSpec(4, 12, 3, True, 0, 0))
    mb = collate(batch, tuple(range(4)), "right")
    plain, _ = forward(loaded.model, mb, torch.device("cpu"), with_labels=True)
    doubled, rejected = forward(loaded.model, mb, torch.device("cpu"), with_labels=True,
                                num_items_in_batch=2 * sum(batch.targets))
    if rejected:
        return "rejected"
    return "ignored" if torch.isclose(plain.loss, doubled.loss) else "honoured"


EXPECTED_DETAIL = {"ignored": "num_items_in_batch ignored", "rejected": "does not accept num_items_in_batch"}


HEAVY = pytest.mark.heavy  # a whole default audit (every path) of a real head each


@pytest.mark.parametrize("name, task", [pytest.param("t5", None, marks=HEAVY), pytest.param("bart", None, marks=HEAVY),
                                        pytest.param("bert", "token-classification", marks=HEAVY),
                                        pytest.param("llama", "sequence-classification", marks=HEAVY),
                                        ("t5", "sequence-classification")])
def test_real_heads_on_the_model_path(name, task):
    report = lossaudit.check(name, task=task, microbatches=[1, 2], empty_sequences=1)
    cases = report.cases
    assert report.model["task"] == (task or "seq2seq")  # an encoder-decoder is audited as seq2seq
    right = cases[cases["padding"] == "right"]
    assert (right.query("reduction == 'num_items'")["verdict"] == "match").all()
    assert (right.query("path == 'model' and microbatches == 1")["verdict"] == "match").all()
    handling = num_items_handling(name, task)
    k2 = right.query("path == 'model' and microbatches == 2")
    if handling == "honoured":
        assert (k2["verdict"] == "match").all(), k2["detail"].tolist()
    else:  # 5.x: T5, BART and the generic heads declare **kwargs and drop it (transformers#47688)
        unequal = k2[k2["tokens"].map(lambda t: len(set(t)) > 1)]
        assert len(unequal) and (unequal["verdict"] == "diverge").all()
        assert all(EXPECTED_DETAIL[handling] in d for d in unequal["detail"]), unequal["detail"].tolist()


def test_a_model_without_position_ids_is_reported_under_left_padding():
    """BART places tokens by absolute index and takes no position_ids: left padding moves
    every token, so even the correct reduction misses, and the report says so."""
    report = lossaudit.check("bart", microbatches=[2], path=["reduction"], reductions=["num_items"])
    left = report.cases[report.cases["padding"] == "left"]
    assert (left["verdict"] == "diverge").all()
    assert all("depends on padding" in d for d in left["detail"])
    assert (report.cases[report.cases["padding"] == "right"]["verdict"] == "match").all()


def test_sequence_classification_sequences_end_with_one_eos():
    """Encoder-decoder heads pool at the last EOS and refuse sequences without one."""
    eos = 3  # also the first id text is drawn from: drawn copies must be replaced
    batch = make_batch(BatchSpec(batch_size=16, max_length=12, seed=1), vocab_size=6, pad_id=0,
                       task="sequence-classification", num_labels=2, eos_id=eos)
    for sample in batch.samples:
        assert sample.input_ids[-1] == eos and int((sample.input_ids == eos).sum()) == 1
