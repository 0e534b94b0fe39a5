"""``lossaudit explain``: what it prints is the library's computation, checked by hand."""

import math
import re

import pytest
import torch

from lossaudit.cli.app import main
from lossaudit.audit import walkthrough as wt

# the worked backpropagation example of the online book chapter "How LLMs learn (3 of 4): Back
# propagation" (a simplified GPT-2): P's rows are the next-token distributions after AI, rocks, <EOS>
P = [[0.4114, 0.2532, 0.3354], [0.2524, 0.4323, 0.3153], [0.3280, 0.2986, 0.3734]]
AI, ROCKS, EOS = 0, 1, 2
# the two-microbatch step: (microbatch, sequence, current token, target token) per target
TARGETS = [(0, 0, ROCKS, EOS),
           (1, 1, AI, ROCKS), (1, 1, ROCKS, EOS),
           (1, 2, ROCKS, AI), (1, 2, AI, ROCKS), (1, 2, ROCKS, EOS)]
HAND_WEIGHTS = {  # N = 6 targets, k = 2 microbatches of 1 and 5 targets, sequences of 1, 2, 3
    "mean_of_means": [1 / 2] + [1 / 10] * 5,
    "num_items": [1 / 6] * 6,
    "sequence_mean": [1 / 3, 1 / 6, 1 / 6, 1 / 9, 1 / 9, 1 / 9],
    "sum": [1.0] * 6,
}


def _prob(current, target):
    return P[current][target] / sum(P[current])  # softmax(log P) renormalises each row


@pytest.fixture(scope="module")
def printed():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["explain"]) == 0
    return out.getvalue()


def test_the_seed_example_prints_1_2639_as_computed_by_hand(printed):
    rocks, eos = -math.log(P[0][1]), -math.log(P[1][2])
    hand = (rocks + eos) / 2
    assert f"{hand:.4f}" == "1.2639"
    assert f"loss = ({rocks:.4f} + {eos:.4f}) / 2 = 1.2639" in printed
    assert f"1        AI      rocks   {P[0][1]:.4f}" in printed


def test_printed_token_losses_and_weights_match_a_hand_computation(printed):
    section = printed.split("weight of each target token")[1].split("the step:")[0]
    rows = [line.split() for line in section.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert len(rows) == len(TARGETS)
    names = list(HAND_WEIGHTS)
    for row, (mb, seq, current, target), j in zip(rows, TARGETS, range(len(TARGETS))):
        assert row[:2] == [str(mb + 1), str(seq + 1)]
        assert row[3] == f"{-math.log(_prob(current, target)):.4f}"
        assert row[4:] == [f"{HAND_WEIGHTS[n][j]:.4f}" for n in names]


def test_walkthrough_weights_losses_and_gradients_are_exact():
    w = wt.walk(*wt.bigram_step())
    losses = [x for s in w.sequences for x in s.losses]
    hand_losses = [-math.log(_prob(c, t)) for _, _, c, t in TARGETS]
    assert losses == pytest.approx(hand_losses, rel=1e-12)
    assert w.counts == [1, 5]
    for name, hand in HAND_WEIGHTS.items():
        assert [x for s in w.sequences for x in s.weights[name]] == pytest.approx(hand, rel=1e-12)
        assert w.losses[name] == pytest.approx(sum(a * b for a, b in zip(hand, hand_losses)), rel=1e-12)
        # dL/dW[current] = sum_t w_t (softmax(W[current]) - onehot(target)), by hand
        grad = torch.zeros(3, 3, dtype=torch.float64)
        for weight, (_, _, current, target) in zip(hand, TARGETS):
            grad[current] += weight * (torch.tensor([_prob(current, v) for v in range(3)], dtype=torch.float64)
                                       - torch.eye(3, dtype=torch.float64)[target])
        torch.testing.assert_close(w.step_grads[name][0], grad, rtol=1e-12, atol=1e-15)
    assert w.grads["num_items"].rel_err < 1e-12
    assert w.grads["mean_of_means"].rel_err > 0.1 and w.grads["mean_of_means"].cosine < 0.99
    assert w.grads["sum"].cosine == pytest.approx(1.0) and w.grads["sum"].scale == pytest.approx(6.0)


def test_explain_on_a_real_tiny_model(capsys):
    assert main(["explain", "--model", "llama"]) == 0
    out = capsys.readouterr().out
    step3 = out.split("3. The same on llama's batch")[1]
    rows = {line.split()[0]: line.split() for line in step3.splitlines()
            if line.strip().startswith(("mean_of_means ", "num_items "))}
    assert float(rows["num_items"][3]) < 1e-5  # grad rel err of the correct reduction
    assert float(rows["mean_of_means"][3]) > 1e-2


def test_an_unknown_model_fails_before_anything_is_printed(capsys):
    assert main(["explain", "--model", "lama"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "did you mean 'llama'" in captured.err and len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("error, shown", [(0.00016, "0.016%"), (0.035, "3.5%"), (0.45, "45%"), (80.0, "8000%"),
                                          (0.0, "0%")])
def test_relative_errors_print_with_two_significant_digits(error, shown):
    assert wt.percent(error) == shown
