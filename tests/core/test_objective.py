"""Objectives (issue 22): each declared aggregation against a plain loop, its window weights
over any split into microbatches against the whole window (Hypothesis), and the harness's own
reduction of a declared objective exact on a float64 toy model under any layout."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lossaudit.audit.harness import calibration
from lossaudit.core.aggregation import PairMean, SequenceMean, SumOver, TokenMean, parse_aggregation
from lossaudit.core.grads import trainable
from lossaudit.core.layouts import GROUPINGS, PADDINGS, Layout, group
from lossaudit.core.objective import Objective, pair_losses
from lossaudit.core.reductions import StepTokens
from lossaudit.core.reference import compute_reference, weighted_sum
from lossaudit.paths.base import AuditContext

from judged import judged
from toy import ToyLM, toy_batch

CPU = torch.device("cpu")


# --- parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("token-mean", TokenMean()), ("sequence-mean", SequenceMean()), ("sum-over:192", SumOver(192)),
    ("sum-over:2.5", SumOver(2.5)), ("pair-mean", PairMean()), ("pair-mean:0.5", PairMean(0.5)),
])
def test_objective_text_is_read_and_written_back(text, value):
    assert parse_aggregation(text) == value
    assert parse_aggregation(value.spec) == value


@pytest.mark.parametrize("text", ["", "mean", "sum-over", "sum-over:", "sum-over:0", "sum-over:-4", "sum-over:x",
                                  "sum-over:inf", "token-mean:3", "pair-mean:0", "sequence-mean:2"])
def test_a_bad_objective_is_one_value_error(text):
    with pytest.raises(ValueError) as info:
        parse_aggregation(text)
    assert "\n" not in str(info.value)


# --- the window's scalar against plain loops ------------------------------------------------

@st.composite
def windows(draw):
    """Float64 per-token losses (B, T) with a target mask; every row may be empty but one."""
    rows = draw(st.integers(1, 6))
    width = draw(st.integers(1, 7))
    counts = [draw(st.integers(0, width)) for _ in range(rows)]
    if not any(counts):
        counts[0] = 1
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for i, n in enumerate(counts):
        mask[i, width - n:] = True  # a prompt, then the targets
    values = draw(st.lists(st.floats(0.01, 20.0), min_size=rows * width, max_size=rows * width))
    losses = torch.tensor(values, dtype=torch.float64).view(rows, width) * mask
    return losses, mask


def plain(aggregation, losses, mask) -> float:
    """What each aggregation means, written as a loop over Python floats."""
    rows = [[float(x) for x, m in zip(r, mr) if m] for r, mr in zip(losses, mask)]
    tokens = [x for r in rows for x in r]
    if isinstance(aggregation, TokenMean):
        return math.fsum(tokens) / len(tokens)
    if isinstance(aggregation, SequenceMean):
        means = [math.fsum(r) / len(r) for r in rows if r]
        return math.fsum(means) / len(means)
    return math.fsum(tokens) / aggregation.n


AGGREGATIONS = st.sampled_from([TokenMean(), SequenceMean(), SumOver(192), SumOver(7.5)])


@settings(max_examples=80, deadline=None)
@given(windows(), AGGREGATIONS)
def test_the_window_loss_is_the_plain_loop(window, aggregation):
    losses, mask = window
    got = float(Objective(aggregation=aggregation).window_loss(losses, mask))
    assert got == pytest.approx(plain(aggregation, losses, mask), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(windows())
def test_the_token_mean_is_computed_as_it_always_was(window):
    losses, mask = window  # bit for bit: reports of the token mean must not move
    assert Objective().window_loss(losses, mask).item() == (losses.sum() / int(mask.sum())).item()


@settings(max_examples=80, deadline=None)
@given(windows(), AGGREGATIONS, st.data())
def test_window_weights_over_any_split_sum_to_the_window(window, aggregation, data):
    """Cut the rows into k microbatches in any order: the weighted microbatch sums add up to the
    declared scalar of the whole window (what makes the harness's own reduction exact)."""
    losses, mask = window
    order = data.draw(st.permutations(range(len(losses))))
    k = data.draw(st.integers(1, len(losses)))
    parts = [p for p in torch.tensor(order).tensor_split(k)]  # index tensors
    objective = Objective(aggregation=aggregation)
    weights = objective.window_weights(StepTokens(tuple(mask[p] for p in parts)))
    total = sum(float(weighted_sum(w, losses[p])) for w, p in zip(weights, parts))
    assert total == pytest.approx(float(objective.window_loss(losses, mask)), rel=1e-12)


# --- the pair mean ----------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-30, 0), st.floats(-30, 0), st.floats(-30, 0), st.floats(-30, 0)),
                min_size=1, max_size=5), st.floats(0.01, 2.0))
def test_the_pair_loss_is_dpo_sigmoid(rows, beta):
    """-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) per pair, rows laid out chosen then rejected."""
    pairs = tuple((i, len(rows) + i) for i in range(len(rows)))
    logps = torch.tensor([r[0] for r in rows] + [r[1] for r in rows], dtype=torch.float64)
    ref = torch.tensor([r[2] for r in rows] + [r[3] for r in rows], dtype=torch.float64)
    got = pair_losses(logps, ref, pairs, beta).tolist()
    for (pc, pr, rc, rr), value in zip(rows, got):
        z = beta * ((pc - rc) - (pr - rr))
        assert value == pytest.approx(math.log1p(math.exp(-z)) if z > -30 else -z, rel=1e-9, abs=1e-12)


def test_at_the_initial_weights_the_pair_mean_is_log_2_and_its_gradient_half_beta():
    """The reference model is the initial weights: every log-ratio is 0, the loss log 2 per
    pair, and d loss / d log pi(chosen) = -beta sigmoid(0) / P."""
    beta, pairs = 0.3, ((0, 2), (1, 3))
    losses = torch.tensor([[1.0, 2.0], [0.5, 0.0], [3.0, 1.0], [2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]], dtype=torch.bool)
    loss = Objective(aggregation=PairMean(beta)).window_loss(losses, mask, pairs)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-15)
    loss.backward()
    # d/d token loss = -d/d logp: chosen rows +beta/2/P, rejected rows -beta/2/P (masked tokens included: 0 losses)
    expected = torch.tensor([beta / 4, beta / 4, -beta / 4, -beta / 4], dtype=torch.float64)[:, None].expand(4, 2)
    assert torch.allclose(losses.grad, expected, rtol=1e-15, atol=0)


# --- the harness's own reduction of a declared objective, on an exact toy --------------------

@st.composite
def layouts(draw):
    n = draw(st.integers(1, 7))
    lengths = draw(st.lists(st.integers(2, 10), min_size=n, max_size=n))
    prompts = [draw(st.integers(0, length - 1)) for length in lengths]
    k = draw(st.integers(1, n))
    return lengths, prompts, k, draw(st.sampled_from(PADDINGS)), draw(st.sampled_from(GROUPINGS))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.sampled_from([SequenceMean(), SumOver(50)]))
def test_the_declared_objectives_own_reduction_is_exact_under_any_layout(step, aggregation):
    lengths, prompts, k, padding, grouping = step
    batch = toy_batch(lengths, prompts)
    model = ToyLM()
    params = trainable(model)
    objective = Objective(aggregation=aggregation)
    reference = compute_reference(model, batch, params, CPU, objective=objective)
    ctx = AuditContext(model, batch, reference, params, CPU, config=None, objective=objective)
    (m, verdict, detail), = judged(ctx, Layout(k, grouping, padding, group(batch, k, grouping)), [calibration(objective)])
    assert abs(m.loss - reference.loss) <= 1e-12 * abs(reference.loss)
    assert m.grads.rel_err <= 1e-12 and verdict == "match", detail
    assert m.label.reduction == aggregation.spec


def test_the_reference_of_a_sequence_mean_is_the_mean_of_each_sequences_token_mean():
    """Against a plain float64 loop over the sequences, one forward each."""
    batch = toy_batch([5, 9, 3, 7], [0, 4, 2, 0])
    model = ToyLM()
    ref = compute_reference(model, batch, trainable(model), CPU, objective=Objective(aggregation=SequenceMean()))
    means = []
    for s in batch.samples:
        logits = model(s.input_ids[None]).logits[0, :-1]
        means.append(torch.nn.functional.cross_entropy(logits, s.labels[1:], ignore_index=-100))
    loss = torch.stack(means).mean()
    grads = torch.autograd.grad(loss, [p for _, p in trainable(model)])
    assert ref.loss == pytest.approx(loss.item(), rel=1e-13)
    for (name, _), g in zip(trainable(model), grads):
        assert torch.allclose(ref.grads[name], g, rtol=1e-12, atol=1e-15), name
