"""lossaudit's batches against the real collators: the same ids through each standard
collator and through ``layouts.collate`` must give the same labels, attention masks and
padding. Where they differ on purpose (left padding of a causal LM, the decoder inputs of a
masked seq2seq prefix) the test pins the difference to the exact positions."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lossaudit.core.batch import BatchSpec, make_batch
from lossaudit.core.layouts import GROUPINGS, collate, group
from lossaudit.core.tokens import IGNORE_INDEX, count_targets, target_mask

VOCAB, PAD = 40, 0
SIDES = ("right", "left")


def tokenizer(side: str):
    """A word-level tokenizer over ids 0..VOCAB-1, pad id PAD, built locally (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")),
                                  pad_token=f"t{PAD}", padding_side=side)
    assert tok.pad_token_id == PAD
    return tok


def batch_of(task: str, *, prompt_masking: bool = True, seed: int = 0, **kw):
    spec = BatchSpec(batch_size=8, max_length=12, min_length=3, prompt_masking=prompt_masking, seed=seed)
    return make_batch(spec, vocab_size=VOCAB, pad_id=PAD, task=task, **kw)


def everything(batch) -> tuple[int, ...]:
    return tuple(range(len(batch)))


def ids(t: torch.Tensor) -> list[int]:
    return [int(x) for x in t]


def prompt_length(labels: torch.Tensor) -> int:
    """Leading ignored labels: the prompt a completion-only collator masks."""
    scored = (labels != IGNORE_INDEX).nonzero()
    return int(scored[0]) if len(scored) else len(labels)


# --- the batch itself -------------------------------------------------------------------


def test_causal_rows_are_collator_rows_and_prompt_masked_rows():
    batch = batch_of("causal-lm")
    prompts = [prompt_length(s.labels) for s in batch.samples]
    for s, p in zip(batch.samples, prompts):
        assert torch.equal(s.labels[p:], s.input_ids[p:])  # after the prompt: the ids themselves
        assert p < len(s.input_ids)
    assert prompts[0::2] == [0] * 4  # unmasked: the first token is a label
    assert all(p >= 1 for p in prompts[1::2])  # masked: a prompt of 1 to T-1 tokens
    # the shift drops the first label: a row of T tokens holds T-1 targets, T-p when masked
    assert batch.targets == [len(s.input_ids) - max(p, 1) for s, p in zip(batch.samples, prompts)]


def test_no_prompt_masking_masks_nothing():
    batch = batch_of("causal-lm", prompt_masking=False)
    assert all(torch.equal(s.labels, s.input_ids) for s in batch.samples)


def test_every_prompt_masks_a_prompt_on_every_sequence():
    """--mask-every-prompt: a chat template's rows, each with a prompt of 1 to T-1 tokens, so no
    sequence's first label is a target (a packed row then has no target at a boundary)."""
    spec = BatchSpec(batch_size=8, max_length=12, min_length=3, every_prompt=True)
    batch = make_batch(spec, vocab_size=VOCAB, pad_id=PAD)
    prompts = [prompt_length(s.labels) for s in batch.samples]
    assert all(1 <= p < len(s.input_ids) for s, p in zip(batch.samples, prompts))
    assert all(torch.equal(s.labels[p:], s.input_ids[p:]) for s, p in zip(batch.samples, prompts))
    assert batch.targets == [len(s.input_ids) - p for s, p in zip(batch.samples, prompts)]


def test_text_never_holds_the_pad_id():
    pad = 5
    spec = BatchSpec(batch_size=8, max_length=32, min_length=16, prompt_masking=False)
    batch = make_batch(spec, vocab_size=8, pad_id=pad)
    assert all(pad not in ids(s.input_ids) for s in batch.samples)


# --- transformers' collators ----------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_language_modeling_collator(side):
    """DataCollatorForLanguageModeling(mlm=False): labels = input_ids, -100 on padding."""
    from transformers import DataCollatorForLanguageModeling

    batch = batch_of("causal-lm", prompt_masking=False)
    real = DataCollatorForLanguageModeling(tokenizer(side), mlm=False)([{"input_ids": ids(s.input_ids)}
                                                                        for s in batch.samples])
    mb = collate(batch, everything(batch), side)
    assert torch.equal(real["input_ids"], mb.input_ids)
    assert torch.equal(real["attention_mask"], mb.attention_mask)
    differ = {tuple(x) for x in (real["labels"] != mb.labels).nonzero().tolist()}
    if side == "right":
        assert differ == set()
    else:
        # left padding: the collator scores a padded row's first token from the pad position
        # before it; lossaudit drops that label, so its targets do not depend on the side
        first = {(row, int(mb.attention_mask[row].argmax())) for row in range(len(batch))
                 if not mb.attention_mask[row, 0]}
        assert first and differ == first
        assert all(int(real["labels"][r, t]) == int(mb.input_ids[r, t]) for r, t in first)
        assert count_targets(real["labels"], "causal-lm") == sum(batch.targets) + len(first)
    assert count_targets(mb.labels, "causal-lm") == sum(batch.targets)


def test_flattening_collator():
    """DataCollatorWithFlattening: one row, each sequence's first label replaced by -100 (the
    separator), positions restarting at 0: the same targets as the padded rows."""
    from transformers import DataCollatorWithFlattening

    batch = batch_of("causal-lm")
    real = DataCollatorWithFlattening()([{"input_ids": ids(s.input_ids), "labels": ids(s.labels)}
                                        for s in batch.samples])
    mb = collate(batch, everything(batch), "right")
    lengths = batch.lengths
    segments = real["labels"][0].split(lengths)
    positions = real["position_ids"][0].split(lengths)
    for row, (labels, pos) in enumerate(zip(segments, positions)):
        n = lengths[row]
        assert int(labels[0]) == IGNORE_INDEX
        assert torch.equal(labels[1:], mb.labels[row, 1:n])
        assert torch.equal(pos, mb.position_ids[row, :n])
    assert count_targets(real["labels"], "causal-lm") == sum(batch.targets)


@pytest.mark.parametrize("side", SIDES)
def test_token_classification_collator(side):
    from transformers import DataCollatorForTokenClassification

    batch = batch_of("token-classification", num_labels=3)
    real = DataCollatorForTokenClassification(tokenizer(side))(
        [{"input_ids": ids(s.input_ids), "labels": ids(s.labels)} for s in batch.samples])
    mb = collate(batch, everything(batch), side)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(torch.as_tensor(real[key]), getattr(mb, key)), key


@pytest.mark.parametrize("side", SIDES)
def test_padding_collator_for_sequence_classification(side):
    from transformers import DataCollatorWithPadding

    batch = batch_of("sequence-classification", num_labels=3, eos_id=2)
    real = DataCollatorWithPadding(tokenizer(side))(
        [{"input_ids": ids(s.input_ids), "label": int(s.labels)} for s in batch.samples])
    mb = collate(batch, everything(batch), side)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(real[key], getattr(mb, key)), key


@pytest.mark.parametrize("side", SIDES)
def test_seq2seq_collator(side):
    """DataCollatorForSeq2Seq pads the labels with -100 on the tokenizer's side. Its decoder
    inputs (the model's shift of the padded labels) equal lossaudit's wherever a decoder
    position is real, except on a masked prefix: the collator shifts -100 in there, which the
    model turns into the pad id, where lossaudit keeps the forced prefix's own tokens."""
    from transformers import BartConfig, BartForConditionalGeneration, DataCollatorForSeq2Seq

    start = 2
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
        decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8, pad_token_id=PAD,
        decoder_start_token_id=start))
    batch = batch_of("seq2seq", decoder_start_id=start)
    real = DataCollatorForSeq2Seq(tokenizer(side), model=model)(
        [{"input_ids": ids(s.input_ids), "labels": ids(s.labels)} for s in batch.samples])
    mb = collate(batch, everything(batch), side)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(real[key], getattr(mb, key)), key
    if side == "left":
        return  # the model's shift of left-padded labels puts the start token before the padding
    for row, s in enumerate(batch.samples):
        n, p = len(s.labels), prompt_length(s.labels)
        theirs, ours = real["decoder_input_ids"][row, :n], mb.decoder_input_ids[row, :n]
        assert torch.equal(theirs[p + 1:], ours[p + 1:]) and int(theirs[0]) == int(ours[0]) == start
        assert all(int(x) == PAD for x in theirs[1:p + 1])


# --- TRL's completion-only masking ------------------------------------------------------


def trl_rows(batch) -> list[dict]:
    """SFTTrainer's own dataset preparation and collator on the batch's ids and prompt lengths:
    a pre-tokenized prompt-completion dataset (``completion_mask``, what its tokenizer step
    writes), labels built with completion_only_loss=True, padded by its collator."""
    trl = pytest.importorskip("trl", reason="trl is not installed: pip install trl")
    datasets = pytest.importorskip("datasets")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if not hasattr(trl.SFTTrainer, "_prepare_dataset"):
        pytest.skip(f"trl {trl.__version__}: no SFTTrainer._prepare_dataset to build labels with")
    rows = [{"input_ids": ids(s.input_ids),
             "completion_mask": [0] * prompt_length(s.labels) + [1] * (len(s.labels) - prompt_length(s.labels))}
            for s in batch.samples]
    args = trl.SFTConfig(output_dir=tempfile.mkdtemp(prefix="lossaudit-trl-"), completion_only_loss=True,
                         max_length=None, report_to="none", use_cpu=True)
    prepared = trl.SFTTrainer._prepare_dataset(SimpleNamespace(completion_only_loss=True),
                                               datasets.Dataset.from_list(rows), None, args, False, None, "train")
    return DataCollatorForLanguageModeling(pad_token_id=PAD)(list(prepared))


def test_trl_completion_only_masking():
    batch = batch_of("causal-lm")
    assert {prompt_length(s.labels) > 0 for s in batch.samples} == {True, False}  # both kinds of row
    real = trl_rows(batch)
    mb = collate(batch, everything(batch), "right")  # TRL pads right
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(real[key], getattr(mb, key)), key


# --- the padding side never changes what is scored ----------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), masking=st.booleans(), k=st.sampled_from([1, 2, 3, 4, 8]),
       grouping=st.sampled_from(GROUPINGS))
def test_left_and_right_padding_score_the_same_targets(seed, masking, k, grouping):
    batch = batch_of("causal-lm", prompt_masking=masking, seed=seed)
    for g in group(batch, k, grouping):
        right, left = collate(batch, g, "right"), collate(batch, g, "left")
        for row, i in enumerate(g):
            n = batch.lengths[i]
            r = right.labels[row, 1:][target_mask(right.labels, "causal-lm")[row]]
            lt = left.labels[row, 1:][target_mask(left.labels, "causal-lm")[row]]
            assert ids(r) == ids(lt) == ids(batch.samples[i].labels[1:n][batch.samples[i].labels[1:n] != IGNORE_INDEX])
        assert count_targets(right.labels, "causal-lm") == count_targets(left.labels, "causal-lm") \
            == batch.group_targets([g])[0]
