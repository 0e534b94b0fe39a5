"""Preference pairs drawn from the seed (issue 22) and their microbatches."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lossaudit.core.batch import BatchSpec
from lossaudit.core.pairs import MIN_PAIR_LENGTH, make_pair_batch, microbatch_pairs, pair_layouts, prompt_length
from lossaudit.core.tokens import IGNORE_INDEX, targets_per_sequence

EOS, PAD = 2, 0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(MIN_PAIR_LENGTH, 40), st.integers(0, 2**32 - 1))
def test_each_pair_shares_its_prompt_and_completions_differ_in_length(pairs, max_length, seed):
    batch = make_pair_batch(BatchSpec(pairs, max_length, seed=seed), vocab_size=50, pad_id=PAD, eos_id=EOS)
    assert batch.pairs == tuple((i, pairs + i) for i in range(pairs)) and len(batch) == 2 * pairs
    for c, r in ((batch.samples[i], batch.samples[j]) for i, j in batch.pairs):
        n = prompt_length(c)
        assert n >= 1 and prompt_length(r) == n and torch.equal(c.input_ids[:n], r.input_ids[:n])
        assert len(c.input_ids) != len(r.input_ids) and max(len(c.input_ids), len(r.input_ids)) <= max_length
        for s in (c, r):
            assert (s.labels[:n] == IGNORE_INDEX).all() and torch.equal(s.labels[n:], s.input_ids[n:])
            assert int(s.input_ids[-1]) == EOS and PAD not in s.input_ids.tolist()
            # the shift leaves exactly the completion as targets: what DPO's log-probability sums
            assert int(targets_per_sequence(s.labels[None], "causal-lm")) == len(s.input_ids) - n


def test_the_same_seed_draws_the_same_pairs():
    a, b = (make_pair_batch(BatchSpec(4, seed=7), vocab_size=50, pad_id=PAD, eos_id=EOS) for _ in range(2))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a.samples, b.samples))


@pytest.mark.parametrize("pairs, k", [(8, 1), (8, 4), (5, 2), (3, 3)])
def test_microbatches_hold_whole_pairs_chosen_rows_first(pairs, k):
    batch = make_pair_batch(BatchSpec(pairs), vocab_size=50, pad_id=PAD, eos_id=EOS)
    (layout,) = pair_layouts(batch, (k,))
    assert sorted(i for g in layout.groups for i in g) == list(range(2 * pairs))
    for g in layout.groups:
        for c, r in microbatch_pairs(len(g)):
            assert (g[c], g[r]) in batch.pairs
    assert max(len(g) for g in layout.groups) - min(len(g) for g in layout.groups) <= 2
