"""stacks/packing.py without any framework: the packs a packed step is given (each microbatch of the
layout one pack, in order), the targets a pack holds (its sequences' own, plus each later sequence's
first label when it is a target: the labels are shifted as one row), and the gradients a packed step
is compared with, against plain per-token computations written here."""

import dataclasses

import pytest
import torch

from lossaudit.core.tokens import IGNORE_INDEX
from lossaudit.stacks.packing import Packs, candidate, packed_count, sizes

from stacks_common import issue_batch, layout_of, plain_count, plain_packed_gradient, reference, rel_err, tiny_llama


@pytest.fixture(scope="module")
def loaded():
    return tiny_llama()


@pytest.fixture(scope="module")
def batch(loaded):
    return issue_batch(loaded)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("grouping", ["contiguous", "imbalanced", "length_sorted"])
def test_each_microbatch_is_one_pack_of_its_rows_in_order(batch, k, grouping):
    layout = layout_of(batch, k, grouping)
    packs = list(Packs(sizes(layout)))
    assert len(packs) == k == len(Packs(sizes(layout)))
    assert [len(p) for p in packs] == [1] * k  # micro_batch_size 1: one pack a microbatch
    flat = [i for p in packs for i in p[0]]
    assert flat == list(range(len(batch.samples)))  # the dataset holds the layout's rows microbatch by microbatch
    assert [len(p[0]) for p in packs] == [len(g) for g in layout.groups]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_a_pack_counts_each_later_sequences_first_label_when_it_is_a_target(batch, k):
    layout = layout_of(batch, k)
    assert packed_count(batch, layout) == [plain_count(batch, g) for g in layout.groups]
    assert sum(packed_count(batch, layout)) > sum(batch.group_targets(layout.groups))  # unmasked rows start with a target


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "crossing"])
@pytest.mark.parametrize("counted", [True, False], ids=["num_items", "mean_of_means"])
def test_each_candidate_is_the_plain_packed_token_mean(loaded, batch, counted, isolated):
    layout = layout_of(batch, 2)
    plain = plain_packed_gradient(loaded.model, batch, layout, counted=counted, isolated=isolated)
    ours = candidate(loaded.model, batch, layout, isolated=isolated, counted=counted, device=torch.device("cpu"))
    assert rel_err(plain, ours.items()) < 1e-6


def test_without_boundary_targets_the_isolated_pack_is_the_reference(loaded, batch):
    """Every sequence's first label ignored: a pack of isolated sequences is exactly the token mean."""
    masked = dataclasses.replace(batch, samples=tuple(
        dataclasses.replace(s, labels=torch.cat([s.labels.new_tensor([IGNORE_INDEX]), s.labels[1:]]))
        for s in batch.samples))
    layout = layout_of(masked, 4)
    assert packed_count(masked, layout) == masked.group_targets(layout.groups)
    ours = candidate(loaded.model, masked, layout, isolated=True, counted=True, device=torch.device("cpu"))
    assert rel_err(reference(loaded.model, masked).grads, ours.items()) < 1e-6
    crossing = candidate(loaded.model, masked, layout, isolated=False, counted=True, device=torch.device("cpu"))
    assert rel_err(reference(loaded.model, masked).grads, crossing.items()) > 1e-2  # attention across sequences
