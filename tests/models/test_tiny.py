"""The tiny-fier: diverse model types built small, consistent, deterministic and trainable."""

import dataclasses

import pytest
import torch
from hypothesis import given, strategies as st

from lossaudit.models import tiny
from lossaudit.models.loading import load_model
from lossaudit.models.tiny import keep_layers, tiny_config

# plain, GPT-2 naming, MoE, MLA + MoE, hybrid mamba/attention (two kinds), hybrid per layer,
# composite text+vision, heterogeneous per-layer config
DIVERSE = ["llama", "gpt2", "mixtral", "deepseek_v3", "jamba", "falcon_h1", "gemma3", "gemma4_text"]


def _configs(config):
    """The config and every sub-config, recursively."""
    yield config
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            yield from _configs(value)


@pytest.mark.parametrize("model_type", DIVERSE)
def test_tiny_config_is_small_and_consistent(model_type):
    config = tiny_config(model_type)
    for c in _configs(config):
        values = tiny._declared(c)
        for name in ("hidden_size", "vocab_size", "intermediate_size"):
            if isinstance(values.get(name), int):
                assert values[name] <= tiny.SIZE_RULES[name] if name != "hidden_size" else values[name] == tiny.WIDTH
        layers = values.get("num_hidden_layers")
        if layers is not None:
            assert layers <= tiny.MAX_LAYERS
            for name in ("layer_types", "mlp_layer_types"):
                if values.get(name) is not None:
                    assert len(values[name]) == layers, name
        for name, value in values.items():
            if isinstance(value, float) and tiny.RANDOM_IN_TRAINING.search(name):
                assert value == 0.0, name
            if name.endswith("_token_id") and isinstance(value, int):
                assert 0 <= value < tiny.VOCAB, (name, value)
        if "use_cache" in values:
            assert values["use_cache"] is False


@pytest.mark.parametrize("model_type", DIVERSE)
def test_tiny_model_trains_and_is_deterministic(model_type):
    a, b = (load_model(model_type, seed=3).model for _ in range(2))
    assert sum(p.numel() for p in a.parameters()) < 2_000_000
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    a.train()
    out = a(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_hybrid_and_sliding_models_keep_one_layer_of_each_kind():
    assert tiny_config("jamba").layers_block_type == ["mamba", "attention"]
    assert set(tiny_config("gemma3").text_config.layer_types) == {"sliding_attention", "full_attention"}
    assert tiny_config("gemma4_text").layer_types == ["sliding_attention", "full_attention"]


def test_mla_and_moe_dimensions_agree():
    c = tiny_config("deepseek_v3")
    assert c.qk_head_dim == c.qk_nope_head_dim + c.qk_rope_head_dim
    assert c.head_dim == c.qk_rope_head_dim  # the roped part, as the model's rotary embedding reads it
    assert c.num_key_value_heads == c.num_attention_heads  # MLA projects keys per head
    assert c.first_k_dense_replace == 1 and c.num_hidden_layers == 2  # one dense layer, one MoE layer
    assert c.num_experts_per_tok <= c.n_routed_experts


def test_heterogeneous_overrides_follow_the_kept_layers():
    c = tiny_config("gemma4_text")  # its full-attention layers have heads twice as wide
    assert c.layer_types == ["sliding_attention", "full_attention"]
    assert c._heterogeneity_spec.per_layer_overrides == {1: {"head_dim": 2 * tiny.HEAD_DIM}}


def test_composite_model_sub_configs_are_tiny():
    c = tiny_config("gemma3")
    assert c.vision_config.hidden_size == tiny.WIDTH and c.vision_config.num_hidden_layers == tiny.LAYERS
    assert c.text_config.vocab_size == tiny.VOCAB


def test_overrides_win():
    assert tiny_config("llama", {"num_hidden_layers": 3}).num_hidden_layers == 3


kinds = st.lists(st.sampled_from("abc"), min_size=1, max_size=40)


@given(kinds)
def test_keep_layers_keeps_the_first_of_each_kind(layer_types):
    keep = keep_layers({"layer_types": layer_types}, len(layer_types))
    assert keep == sorted(set(keep)) and all(0 <= i < len(layer_types) for i in keep)
    assert min(tiny.LAYERS, len(layer_types)) <= len(keep) <= tiny.MAX_LAYERS
    firsts = sorted({layer_types.index(k) for k in layer_types})
    assert set(firsts) <= set(keep)


@given(st.integers(1, 40), st.data())
def test_keep_layers_counts_thresholds_and_index_lists(count, data):
    dense = data.draw(st.integers(0, count))
    moe = data.draw(st.lists(st.integers(0, count - 1), unique=True))
    keep = keep_layers({"first_k_dense_replace": dense, "mlp_only_layers": moe}, count)
    assert (0 < dense) == any(i < dense for i in keep)  # a dense layer is kept when there is one
    assert (0 < dense < count) <= any(i >= dense for i in keep)  # and a MoE layer too
    assert bool(moe) == any(i in moe for i in keep)


def test_kolibri_keeps_an_indexer_and_a_reindexer_and_its_loss_matches():
    pytest.importorskip("transformers.models.kolibri1_1")
    import lossaudit

    c = tiny_config("kolibri1_1")
    assert c.layer_types == ["sliding_attention", "indexed_attention", "indexed_attention"]
    assert c.index_layers == [1] and c.kv_source_layers == [0, 1, 1]  # layer 2 rescores layer 1's pool
    assert c.index_topk < 32 and c.index_num_heads <= c.num_attention_heads // c.num_key_value_heads
    report = lossaudit.check("kolibri1_1", paths=["model"], microbatches=[1, 4], groupings=["imbalanced"])
    assert len(report.cases) == 4 and (report.cases["verdict"] == "match").all()
