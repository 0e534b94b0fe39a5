"""Tiny configs: any model type's default config shrunk to a model of a few hundred
thousand parameters, with every dependent dimension kept consistent.

The shrinking is data, not code per model:

- ``SIZE_RULES``: attribute name -> tiny value (or a function of the default value),
  applied to every declared field of a config and of each of its sub-configs
  (``text_config``, ``vision_config``, ...) whose default is not None;
- per-layer lists (``layer_types``, ``mlp_layer_types``, ...) are cut to a few
  representative layers, one of each kind the default config mixes (sliding and full
  attention, dense and MoE, mamba and attention), and layer-index lists
  (``mlp_only_layers``, ...) are renumbered to match;
- ``QUIRKS``: the few model types that need one more setting, each with its reason.

Only fields the config declares are passed back to its constructor, so whatever the
config derives in ``__post_init__`` (``head_dim`` of an MLA model, ``layer_types`` from a
sliding-window pattern) is derived again from the tiny values.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from ..core.errors import UsageError

WIDTH = 64  # hidden size
HEADS = 4
KV_HEADS = 2
HEAD_DIM = WIDTH // HEADS
FFN = 2 * WIDTH
EXPERT_FFN = 32
EXPERTS = 4
TOP_K = 2
LAYERS = 2  # fewest layers; more only to keep one of each layer kind
MAX_LAYERS = 4
VOCAB = 256
POSITIONS = 256
WINDOW = 16  # shorter than the audit's longest sequence, so sliding attention slides
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # below lossaudit.core.batch.FIRST_TOKEN_ID: never drawn as text
LABELS = 3  # classification heads: more than two classes, so no binary shortcut hides
# read by every head; generic classification heads fall back to 0.1 when classifier_dropout is unset
HEAD_DEFAULTS = {"num_labels": LABELS, "classifier_dropout": 0.0}


def _at_most(limit: int) -> Callable[[int | None, dict], int]:
    return lambda default, _values: limit if default is None else min(default, limit)


def _kv_heads(default: int | None, values: dict) -> int:
    """Multi-head attention stays multi-head (None says so too), multi-query stays multi-query."""
    heads = next((values[n] for n in ("num_attention_heads", "n_head", "num_heads") if n in values), None)
    if default is None or default == heads:
        return HEADS
    return 1 if default == 1 else KV_HEADS


def _head_dim(_default, values: dict) -> int:
    # multi-head latent attention ropes only part of each head: its head_dim is that part
    return HEAD_DIM // 2 if "qk_rope_head_dim" in values else HEAD_DIM


def _mamba_heads(_default, values: dict) -> int:
    # mamba heads tile the mixer's width, expand * hidden_size
    return next((values[n] for n in ("mamba_expand", "expand") if isinstance(values.get(n), int)), 2) * WIDTH // HEAD_DIM


def _names(*names: str, value) -> dict[str, Any]:
    return dict.fromkeys(names, value)


# name -> tiny value, or a function of (default value, every default value of the config).
SIZE_RULES: dict[str, Any] = {
    **_names("hidden_size", "d_model", "n_embd", "embed_dim", "word_embed_proj_dim", "embedding_size",
             "lru_width", "hidden_size_global", "emb_dim", "cross_attention_hidden_size", "out_hidden_size",
             "projector_input_dim", "projector_output_dim", "vision_output_dim", "adapter_in_dim",
             "adapter_out_dim", "adapter_input_size", value=WIDTH),
    **_names("intermediate_size", "ffn_dim", "d_ff", "n_inner", "ffn_hidden_size", "encoder_ffn_dim",
             "decoder_ffn_dim", "dense_intermediate_size", "intermediate_size_mlp", "dim_ff",
             "prefix_dense_intermediate_size", "feed_forward_size", value=FFN),
    **_names("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
             "moe_shared_expert_intermediate_size", "shared_intermediate_size", value=EXPERT_FFN),
    **_names("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
             "decoder_attention_heads", "attention_heads", "swa_num_attention_heads", "index_n_heads",
             "indexer_n_heads", "linear_num_value_heads", "linear_num_heads", "conf_num_attention_heads",
             "num_decoder_attention_heads", "num_encoder_attention_heads", value=HEADS),
    **_names("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num",
             "num_query_groups", "swa_num_key_value_heads", "linear_num_key_heads", "kv_n_heads",
             "indexer_kv_heads", value=_kv_heads),
    "head_dim": _head_dim,
    **_names("d_kv", "kv_channels", "attention_head_dim", "dim_head", "d_head",
             "attention_head_size", "swa_head_dim", "index_head_dim", "indexer_head_dim",
             "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", value=HEAD_DIM),
    # multi-head latent attention (DeepSeek-V2/V3 and kin): q/k = nope + rope parts
    "kv_lora_rank": 2 * HEAD_DIM,
    "q_lora_rank": 2 * HEAD_DIM,
    "o_lora_rank": 2 * HEAD_DIM,
    "qk_rope_head_dim": HEAD_DIM // 2,
    "qk_nope_head_dim": HEAD_DIM // 2,
    "qk_head_dim": HEAD_DIM,
    "v_head_dim": HEAD_DIM,
    "rotary_dim": HEAD_DIM // 2,
    # mixture of experts
    **_names("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", value=EXPERTS),
    **_names("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "moe_k", "top_k",
             value=_at_most(TOP_K)),
    **_names("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", value=_at_most(1)),
    **_names("n_group", "num_expert_group", "topk_group", value=_at_most(1)),
    **_names("zero_expert_num", value=_at_most(1)),
    # a layer pattern stated as a period and an offset: keep both kinds within two layers
    **_names("attn_layer_period", "expert_layer_period", value=2),
    **_names("attn_layer_offset", "expert_layer_offset", value=_at_most(1)),
    **_names("num_nextn_predict_layers", "num_mtp_layers", value=_at_most(1)),
    # layers that reuse an earlier layer's key/value cache: the few kept layers all make their own
    "num_kv_shared_layers": 0,
    # state-space and linear-attention mixers
    **_names("state_size", "ssm_state_size", "mamba_d_state", "time_step_rank", "mamba_dt_rank",
             value=16),
    **_names("mamba_n_groups", "n_groups", "mamba_ngroups", value=_at_most(1)),
    **_names("mamba_d_head", "mamba_head_dim", "mamba_headdim", value=HEAD_DIM),
    **_names("mamba_n_heads", "n_mamba_heads", "mamba_num_heads", value=_mamba_heads),
    "mamba_d_ssm": lambda _default, values: values.get("mamba_expand", 2) * WIDTH,
    # vocabularies, positions, windows
    **_names("vocab_size", "decoder_vocab_size", "audio_vocab_size", value=VOCAB),
    **_names("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions",
             "max_source_positions", "model_max_length", value=POSITIONS),
    **_names("sliding_window", "sliding_window_size", "attention_window_size", "local_attention_window_len",
             value=_at_most(WINDOW)),
}

# Rules by name pattern, for the fields no exact name above covers.
PATTERN_RULES: tuple[tuple[re.Pattern, Any], ...] = (
    (re.compile(r"vocab_size|_vocab$"), _at_most(VOCAB)),  # per-layer-input, n-gram, hash, type vocabularies
    (re.compile(r"hidden_size_per_layer"), _at_most(HEAD_DIM)),
)

# None switches these off; every other exact-name size rule also fills a None the model would trip on.
OFF_WHEN_NONE = ("q_lora_rank", "o_lora_rank", "kv_lora_rank", "sliding_window", "sliding_window_size",
                 "attention_window_size", "local_attention_window_len", "rotary_dim", "mamba_d_ssm",
                 "index_n_heads", "index_head_dim", "indexer_n_heads", "indexer_kv_heads", "indexer_head_dim")

# Lists of layer indices (not one entry per layer): renumbered to the layers kept.
INDEX_LISTS = ("mlp_only_layers", "attn_layer_indices", "hybrid_layer_ids", "full_attn_idxs",
               "global_attn_indexes", "local_layer_ids", "cross_attention_layers", "moe_layers", "ple_layer_ids")

# A layer with index below this is of the first kind (dense before MoE, window before global).
THRESHOLDS = ("first_k_dense_replace", "max_window_layers", "num_dense_layers")

LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers", "encoder_layers",
                "num_decoder_layers", "num_encoder_layers", "conf_num_hidden_layers")

# Randomness in train mode would make the full batch and its microbatches differ for
# reasons that are not the loss reduction: every such rate is 0.
RANDOM_IN_TRAINING = re.compile(r"drop|pdrop|jitter|noise|mask_(time|feature)_prob|layerdrop")

QSA_INDEXER = {"indexer_n_heads": HEADS, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
               "indexer_budget": 8, "indexer_compress_ratio": 4}

# Model types that need one more setting than the rules give; each says why.
QUIRKS: dict[str, tuple[dict, str]] = {
    "mamba2": ({"num_heads": 2 * WIDTH // HEAD_DIM}, "its heads (num_heads) tile hidden_size * expand"),
    "gpt_neo": ({"attention_types": [[["global", "local"], 1]]}, "its layer pattern is a count of repeats"),
    "dbrx": ({"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
             "DbrxAttention reads attn_config.rope_theta, which the default config lacks, and clamps by clip_qkv"),
    "lfm2_moe": ({"layer_types": ["conv", "full_attention"]},
                 "the default config leaves layer_types None, which the model indexes"),
    "cohere_compass_text": ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
                            "the default rope_parameters are not keyed by layer type as the model reads them"),
    "xmod": ({"default_language": "en_XX"}, "X-MOD routes through a language adapter and has no default language"),
    "zamba": ({"num_hidden_layers": 4, "layers_block_type": ["linear_attention", "hybrid"] * 2},
              "its shared attention block is tied across hybrid layers: it needs two of them"),
    "qwen4_exp_text": (QSA_INDEXER, "its default config has indexed-attention layers but leaves their indexer unset"),
    "qwen4_exp": ({"text_config": QSA_INDEXER}, "as qwen4_exp_text"),
    # a sliding layer's head_dim is its qk_nope + qk_rope (192 + 64 by default), shrunk with them
    "dots3_note_text": ({"head_dim": HEAD_DIM // 2 + 12}, "its sliding layers' head_dim is their qk_nope + qk_rope"),
    "dots3_note": ({"text_config": {"head_dim": HEAD_DIM // 2 + 12}}, "as dots3_note_text"),
    # every 5th layer is indexed attention (past the kept layers), kv_source_layers holds layer
    # indices (not renumbered by slicing) and index_num_heads (12) must fit the query heads of one
    # key head: one sliding layer, an indexer and a reindexer that reads its keys, with a top-k
    # and pool below the audit's sequence length so the selection is exercised
    "kolibri1_1": ({"num_hidden_layers": 3, "layer_types": ["sliding_attention", *["indexed_attention"] * 2],
                    "kv_source_layers": [0, 1, 1], "index_layers": [1], "mlp_only_layers": [0],
                    "index_num_heads": HEADS // KV_HEADS, "index_topk": 8, "index_pool_size": 16,
                    "index_compression": 4, "index_num_local_tokens": 4, "index_num_sink_tokens": 2},
                   "its default indexed-attention layout lies past the kept layers and names layers by index"),
}


def tiny_config(model_type: str, overrides: dict | None = None, num_layers: int | None = None):
    """The model type's default config made tiny (see the module doc), ``num_layers`` deep if given."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    kwargs = merge({**HEAD_DEFAULTS, **tiny_kwargs(base)}, QUIRKS.get(model_type, ({}, ""))[0])
    kwargs.update(overrides or {})
    config = AutoConfig.for_model(model_type, **kwargs)
    if num_layers is None:
        return config
    return AutoConfig.for_model(model_type, **{**kwargs, **depth_kwargs(config, num_layers), **(overrides or {})})


def tiny_keys(model_type: str) -> set[str]:
    """The keys ``tiny_config`` sets, which a ``--config-arg`` may set too, declared or not
    (T5's decoder_start_token_id, a classification head's classifier_dropout)."""
    from transformers import AutoConfig

    return {*HEAD_DEFAULTS, *tiny_kwargs(AutoConfig.for_model(model_type)), *QUIRKS.get(model_type, ({}, ""))[0]}


def merge(kwargs: dict, extra: dict) -> dict:
    """``kwargs`` updated by ``extra``, sub-config dicts merged key by key."""
    out = dict(kwargs)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_kwargs(config) -> dict:
    """Constructor keyword arguments that make ``config`` tiny, sub-configs included."""
    values = _declared(config)
    kwargs = {}
    for name, default in values.items():
        if _is_config(default):
            kwargs[name] = _sub_kwargs(config, name, default)
    kwargs.update(sized(values))
    kwargs.update(_layer_kwargs(values, _layer_overrides(config)))
    kwargs.update(_token_kwargs(values))
    if "use_cache" in values:
        kwargs["use_cache"] = False  # training: no key/value or recurrent state cache
    return kwargs


def sized(values: dict, context: dict | None = None) -> dict:
    """The size rules and the zeroed random rates, applied to ``values`` (name -> default)."""
    context = values if context is None else context
    kwargs = {}
    for name, default in values.items():
        rule = _rule_for(name)
        fills_none = name in SIZE_RULES and name not in OFF_WHEN_NONE
        if rule is not None and _is_size(default) and (default is not None or fills_none):
            kwargs[name] = rule(default, context) if callable(rule) else rule
        elif isinstance(default, float) and RANDOM_IN_TRAINING.search(name):
            kwargs[name] = 0.0
    return kwargs


def _rule_for(name: str):
    if name in SIZE_RULES:
        return SIZE_RULES[name]
    return next((rule for pattern, rule in PATTERN_RULES if pattern.search(name)), None)


def _is_size(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _declared(config) -> dict[str, Any]:
    """The config's dataclass fields with their values after ``__post_init__``."""
    if hasattr(config, "allow_global_per_layer_attribute_access"):  # a heterogeneous config's global values
        config.allow_global_per_layer_attribute_access = True
    if not dataclasses.is_dataclass(config):  # transformers 4.x: configs hold plain attributes
        return {k: v for k, v in vars(config).items() if not k.startswith("_")}
    return {f.name: getattr(config, f.name, None) for f in dataclasses.fields(config) if not f.name.startswith("_")}


def _layer_overrides(config) -> dict[int, dict]:
    """A heterogeneous config's per-layer overrides (``per_layer_config``), by layer index."""
    spec = config.__dict__.get("_heterogeneity_spec")
    return {int(i): dict(v) for i, v in spec.per_layer_overrides.items()} if spec is not None else {}


def _is_config(value) -> bool:
    import transformers

    # PretrainedConfig until transformers 5 renamed it
    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    return isinstance(value, base)


def _sub_kwargs(parent, name: str, sub) -> dict:
    """A sub-config as a dict for the parent's constructor; the parent's defaults for it kept."""
    spec = (getattr(type(parent), "sub_configs_defaults", None) or {}).get(name)  # transformers 5+
    base = dict(spec.init_kwargs) if spec is not None else {}
    return {**base, "model_type": sub.model_type, **tiny_kwargs(sub)}


def _layer_count(values: dict) -> tuple[str, int] | None:
    for name in LAYER_COUNTS:
        if isinstance(values.get(name), int) and values[name] > 0:
            return name, values[name]
    return None


def _per_layer(values: dict, count: int) -> dict[str, list]:
    return {
        name: list(v) for name, v in values.items()
        if isinstance(v, (list, tuple)) and len(v) == count and name not in INDEX_LISTS
        and re.search(r"layer|block|pattern", name) and all(not isinstance(x, (list, dict)) for x in v)
    }


def keep_layers(values: dict, count: int, overrides: dict[int, dict] | None = None) -> list[int]:
    """Indices of the layers to keep: the first of each kind, then the next ones, LAYERS at least."""
    per_layer = _per_layer(values, count)
    index_sets = {n: set(values[n]) for n in INDEX_LISTS if isinstance(values.get(n), (list, tuple))}
    thresholds = {n: values[n] for n in THRESHOLDS if isinstance(values.get(n), int)}

    def kind(i: int) -> tuple:
        return (tuple(v[i] for v in per_layer.values()), tuple(i in s for s in index_sets.values()),
                tuple(i < t for t in thresholds.values()), repr(sorted((overrides or {}).get(i, {}).items())))

    keep: list[int] = []
    seen: set = set()
    for i in range(count):
        if kind(i) not in seen and len(keep) < MAX_LAYERS:
            seen.add(kind(i))
            keep.append(i)
    for i in range(count):
        if len(keep) >= min(LAYERS, count):
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _layer_kwargs(values: dict, overrides: dict[int, dict]) -> dict:
    found = _layer_count(values)
    if found is None:
        return {}
    name, count = found
    keep = keep_layers(values, count, overrides)
    # other layer counts (an encoder's beside a decoder's) have no per-layer lists to follow
    kwargs: dict[str, Any] = {n: min(values[n], LAYERS) for n in LAYER_COUNTS if isinstance(values.get(n), int)}
    kwargs.update(_renumbered(values, name, count, keep))
    if overrides:
        kwargs["per_layer_config"] = {j: _sized_override(o, values) for j, i in enumerate(keep) if (o := overrides.get(i))}
    return kwargs


def depth_kwargs(config, num_layers: int, grow: bool = True) -> dict:
    """Constructor keyword arguments that give ``config`` ``num_layers`` layers (``--num-layers``):
    its first layers, or (``grow``: a model built from its config) its layer pattern repeated."""
    values = _declared(config)
    found = _layer_count(values)
    if found is None:
        raise UsageError(f"--num-layers: the {config.model_type} config has no layer count to change")
    name, count = found
    if num_layers > count and not grow:
        raise UsageError(f"--num-layers {num_layers}: the checkpoint has {count} layers; it can be cut, not grown")
    kwargs: dict[str, Any] = {n: num_layers for n in LAYER_COUNTS if isinstance(values.get(n), int)}
    kwargs.update(_renumbered(values, name, count, [i % count for i in range(num_layers)]))
    return kwargs


def _renumbered(values: dict, name: str, count: int, keep: list[int]) -> dict:
    """The layer count and every per-layer setting for the layers ``keep`` (old indices, in order)."""
    kwargs: dict[str, Any] = {name: len(keep)}
    for key, per in _per_layer(values, count).items():
        kwargs[key] = [per[i] for i in keep]
    for key in INDEX_LISTS:
        if isinstance(values.get(key), (list, tuple)):
            kwargs[key] = [j for j, i in enumerate(keep) if i in set(values[key])]
    for key in THRESHOLDS:
        if isinstance(values.get(key), int):
            kwargs[key] = sum(i < values[key] for i in keep)
    return kwargs


def _sized_override(override: dict, values: dict) -> dict:
    """One layer's overrides, shrunk in proportion to the global value they differ from, so
    the layer stays different (a head twice as wide stays twice as wide)."""
    tiny_global = sized(values)
    out = {**override, **sized(override, {**values, **override})}
    for name, value in override.items():
        default, small = values.get(name), tiny_global.get(name)
        if all(_is_size(v) and v for v in (value, default, small)):
            out[name] = max(1, round(small * value / default))
    return out


def _token_kwargs(values: dict) -> dict:
    """Special token ids inside the tiny vocabulary, below the ids the audit's batches draw."""
    vocab = values.get("vocab_size")
    if not isinstance(vocab, int):
        return {}
    vocab = SIZE_RULES["vocab_size"]
    kwargs = {}
    for name, value in values.items():
        if not name.endswith(("_token_id", "_token_index")) or value is None:
            continue
        ids = value if isinstance(value, (list, tuple)) else [value]
        if all(isinstance(i, int) and 0 <= i < vocab for i in ids):
            continue
        new = {"pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "decoder_start_token_id": PAD_ID}.get(name, BOS_ID)
        kwargs[name] = [new] if isinstance(value, (list, tuple)) else new
    if values.get("is_encoder_decoder") and values.get("decoder_start_token_id") is None:
        # T5's config (5.x) leaves it to the generation config, yet its classification head
        # shifts input_ids right with config.decoder_start_token_id
        kwargs["decoder_start_token_id"] = PAD_ID
    return kwargs
