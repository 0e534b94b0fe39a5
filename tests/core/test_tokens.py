import math

import torch

from lossaudit.core.tokens import IGNORE_INDEX, align, count_targets, drop_after_padding, target_mask, token_losses


def test_causal_alignment_pairs_position_t_with_label_t_plus_1():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float64).view(2, 4, 3)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 0], [IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX]])
    scored, targets = align(logits, labels, "causal-lm")
    assert torch.equal(scored, logits[:, :3])
    assert targets.tolist() == [[1, 2, 0], [IGNORE_INDEX, 2, IGNORE_INDEX]]
    assert count_targets(labels, "causal-lm") == 4
    assert target_mask(labels, "causal-lm").sum(dim=1).tolist() == [3, 1]


def test_token_losses_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, 6, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 0, 2, 5]])
    losses = token_losses(logits, labels, "causal-lm")
    assert losses.dtype == torch.float64
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            row = logits[b, t].double()
            want = 0.0 if y == IGNORE_INDEX else float(torch.logsumexp(row, 0) - row[y])
            assert math.isclose(float(losses[b, t]), want, rel_tol=1e-12, abs_tol=1e-12)


def test_token_classification_does_not_shift():
    labels = torch.tensor([[0, IGNORE_INDEX, 2]])
    assert target_mask(labels, "token-classification").tolist() == [[True, False, True]]
    assert count_targets(torch.tensor([3, IGNORE_INDEX]), "sequence-classification") == 1


def test_a_label_after_padding_is_dropped_only_in_a_causal_lm():
    # left padding: row 1's first token (7) would be scored from the pad position before it
    labels = torch.tensor([[5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    dropped = drop_after_padding(labels, mask, "causal-lm")
    assert dropped.tolist() == [[5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8]]
    assert target_mask(dropped, "causal-lm").sum(dim=1).tolist() == [3, 1]  # T-1 each, as unpadded
    assert torch.equal(drop_after_padding(labels, mask, "token-classification"), labels)
    # right padding: nothing follows padding but padding, so nothing changes
    right = torch.tensor([[7, 8, IGNORE_INDEX, IGNORE_INDEX]])
    assert torch.equal(drop_after_padding(right, torch.tensor([[1, 1, 0, 0]]), "causal-lm"), right)
