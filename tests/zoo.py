"""A zoo of tiny random-initialised causal LMs: one per family of the installed transformers.

Every family of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (200 in transformers 5.25) is built from its
config class, nothing downloaded, with every size made tiny: hidden 32, 2 layers, 4 heads / 2 kv
heads of dim 8 (MHA and MQA families stay so), intermediate 48, vocab 61, max positions 64, sliding
windows 4 (so that 8 tokens exercise them), 4 experts top-2 of intermediate 16 (shared experts capped
at 1, group routing 2 groups / 1 kept, at most one leading dense layer so that an MoE layer exists),
ssm state 4; eager attention and eager experts; no cache; every dropout probability = ``dropout``
(layer-drop, router jitter and MTP layers off). The model is cast to ``dtype`` and returned in eval
mode; the same seed gives the same weights.

    build(family, dtype=torch.float64, dropout=0.0, seed=0, layers=2) -> model   (layers >= 2)
    config(family, dropout=0.0, layers=2) -> the tiny config
    batch(model, b=3, t=8, seed=0) -> {input_ids, attention_mask, labels}
    vocab(model) -> the logits' vocabulary (61)
    FAMILIES, status(family), UNBUILDABLE, KIND, MOE, CAVEATS, survey()

The shrinking is generic, by config field name, recursively through sub-configs; per-layer lists
(layer_types, mlp_layer_types, ...) are cut to ``layers`` entries keeping as many distinct layer
kinds as possible, and fields a config derives are left for it to derive again. What the generic
rules get wrong for a family is in ``PATCHES``, one reason each. ``FAMILIES``, ``UNBUILDABLE``,
``KIND``, ``MOE`` and ``CAVEATS`` are static; ``survey()`` (or ``python tests/zoo.py``) reruns the
check behind ``status`` on every family, compares it with them and times it (about 13 s on 2 cores).
"""
from __future__ import annotations

import re
import time
import warnings

import torch

VOCAB = 61
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 8
INTERMEDIATE = 48
EXPERTS = 4
TOP_K = 2
EXPERT_INTERMEDIATE = 16
RANK = 8
STATE = 4
MAX_POS = 64
WINDOW = 4


def _mapping():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


# --------------------------------------------------------------------------------------------
# generic shrinking rules, by field name
# --------------------------------------------------------------------------------------------

_LAYERS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
           "num_decoder_layers", "num_encoder_layers", "conf_num_hidden_layers", "num_global_layers",
           "num_layers_per_stack", "depth", "num_blocks"}
_HIDDEN = {"hidden_size", "d_model", "n_embd", "emb_dim", "embedding_dim", "attention_hidden_size", "lru_width",
           "backbone_hidden_size", "hidden_size_global", "word_embed_proj_dim", "embedding_size",
           "input_embedding_size", "output_embedding_size", "cross_attention_hidden_size", "router_hidden_size",
           "ple_embed_dim", "out_hidden_size", "vision_output_dim", "projector_input_dim", "projector_output_dim",
           "adapter_in_dim", "adapter_out_dim", "adapter_input_size", "conv_output_size", "downsample_hidden_size",
           "vector_quantization_hidden_dimension", "codebook_dim", "mlp_dim", "output_channels",
           "pronunciation_embed_dim", "shape_embed_dim", "hidden_size_per_layer_input", "prompt_mid_dim",
           "dim_model_base"}
_HEADS = {"num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "encoder_attention_heads",
          "decoder_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads",
          "swa_num_attention_heads", "index_n_heads", "index_num_heads", "indexer_n_heads", "linear_num_heads",
          "linear_num_value_heads", "mamba_n_heads", "mamba_num_heads", "n_mamba_heads", "conf_num_attention_heads",
          "heads_per_ngram", "num_attention_heads_per_layer"}
_KV_HEADS = {"num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "linear_num_key_heads",
             "num_query_groups", "indexer_kv_heads", "num_global_key_value_heads"}
_HEAD_DIM = {"head_dim", "d_head", "dim_head", "attention_head_size", "attention_head_dim", "swa_head_dim",
             "index_head_dim", "indexer_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim",
             "mamba_d_head", "mamba_head_dim", "mamba_headdim", "kv_channels", "d_kv", "v_head_dim",
             "global_head_dim", "rotary_dim"}
_INTERMEDIATE = {"intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "d_ff", "dff", "dim_ff",
                 "d_inner", "feed_forward_size", "ffn_hidden_size", "n_inner", "intermediate_size_mlp",
                 "dense_intermediate_size", "first_dense_intermediate_size", "mlp_only_intermediate_size",
                 "prefix_dense_intermediate_size", "shared_intermediate_size"}
_EXPERT_INTERMEDIATE = {"moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
                        "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size"}
_EXPERTS = {"num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"}
_TOP_K = {"num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts"}
_RANK = {"q_lora_rank", "kv_lora_rank", "o_lora_rank", "adapter_rank", "laurel_rank", "loop_gate_rank",
         "gated_norm_rank", "hc_lowrank", "time_step_rank", "mamba_dt_rank"}
_STATE = {"state_size", "mamba_d_state", "ssm_state_size"}
_POSITIONS = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
              "max_target_positions", "max_source_positions", "original_max_position_embeddings",
              "model_max_length", "position_bias_max_distance", "rel_extent", "relative_max_distance",
              "log_scaling_n_floor"}
_WINDOWS = {"sliding_window", "sliding_window_size", "attention_window_size", "local_attention_window_len",
            "window_size", "attention_chunk_size", "keep_window_size", "local_attention"}
_CHUNKS = {"chunk_size", "mamba_chunk_size"}
# other sizes, each at most this
_MISC = {"zero_expert_num": 2, "block_multiple_of": 16, "ffn_round_up_to_multiple_of": 16, "prompt_length": 4,
         "position_bias_num_buckets": 32, "encoder_hash_byte_group_vocab": 64, "image_size": 32, "patch_size": 4,
         "nemo_conv_channels": 32, "depthwise_separable_out_channel": 32,
         "ext_pw_out_channel": 32, "num_centroids": 8, "centroid_intermediate_top_k": 2, "mm_tokens_per_image": 4,
         "image_seq_length": 4, "audio_soft_tokens_per_image": 4, "vision_soft_tokens_per_image": 4,
         "num_position_embeddings": 16, "bias_max_distance": 16,
         # multi-head latent attention: rope + nope = the head dim
         "qk_rope_head_dim": HEAD_DIM // 2, "qk_nope_head_dim": HEAD_DIM // 2}
# sparse-attention indexers (DSA, QSA, ...): select among the 8 tokens of a test batch
_INDEXER = {"index_topk": 4, "index_topk_blocks": 2, "index_block_size": 2, "index_pool_size": 8,
            "index_compression": 2, "index_num_local_tokens": 2, "index_num_sink_tokens": 1,
            "indexer_budget": 4, "indexer_compress_ratio": 2}
# group-limited routing (n_group > 1 by default): 2 groups of 2 experts, the best group kept
_EXPERT_GROUPS = {"n_group": 2, "num_expert_group": 2, "topk_group": 1}
_ONE_IF_MORE = {"n_groups", "mamba_n_groups", "mamba_ngroups",
                "n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "first_k_dense_replace",
                "num_dense_layers", "num_dense_blocks", "moe_layer_start_index", "decoder_sparse_step",
                "interleave_moe_layer_step", "moe_layer_interval", "num_mem_blocks", "o_groups"}
_ZERO = {"num_nextn_predict_layers", "num_mtp_layers", "encoder_layerdrop", "decoder_layerdrop", "layerdrop",
         "router_jitter_noise", "input_jitter_noise", "mask_time_prob", "mask_feature_prob"}
_FALSE = {"use_cache", "output_router_logits", "use_mamba_kernels", "use_mem_eff_path"}
_INDEX_LISTS = {"full_attn_idxs", "hybrid_layer_ids", "index_layers", "moe_layers", "cross_attention_layers",
                "mlp_only_layers", "local_layer_ids", "attn_layer_indices", "global_attn_indexes",
                "intermediate_layers_indices", "mtp_local_layer_ids"}
# fields a family leaves None in its default config (a hub checkpoint supplies them) but needs
_FILL_NONE = {"num_experts_per_tok": TOP_K, "n_routed_experts": EXPERTS, "num_experts": EXPERTS, "head_dim": HEAD_DIM,
              "num_key_value_heads": KV_HEADS, "indexer_n_heads": HEADS, "indexer_kv_heads": 1,
              "indexer_head_dim": HEAD_DIM, "n_inner": INTERMEDIATE}
# derived fields (see _derived) that are left to the config: sizes that must agree with others
_CONSISTENT = _HIDDEN | _HEAD_DIM | _KV_HEADS
_DROPOUT = re.compile(r"dropout|pdrop|drop_prob|dropout_p")
_SPECIAL_TEXT_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_META = {"transformers_version", "architectures", "_name_or_path", "model_type", "dtype", "id2label", "label2id",
         "output_hidden_states", "return_dict", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
         "output_attentions"}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _small(v, new):
    """new, but never more than the original (a family's own small default stays)."""
    return min(v, new) if _is_int(v) and v > 0 else v


class _Ctx:
    """What a shrink pass needs: the target layer count and the special ids it has handed out."""

    def __init__(self, layers: int):
        self.layers = layers
        self.next_high = VOCAB - 1
        self.high = {}  # original id -> new high id (multimodal / special tokens kept out of the text ids)
        self.sub_patches = {}  # sub-config key -> a family's overrides for it

    def high_id(self, v):
        if v not in self.high:
            self.high[v] = self.next_high
            self.next_high -= 1
        return self.high[v]


def _token_id(key, v, ctx):
    if key in _SPECIAL_TEXT_IDS:
        new = _SPECIAL_TEXT_IDS[key]
        if isinstance(v, (list, tuple)):
            return [new]
        return None if v is None else new
    if isinstance(v, (list, tuple)):
        return [ctx.high_id(x) if _is_int(x) else x for x in v]
    return ctx.high_id(v) if _is_int(v) else v


def _shrink_int(key, v, orig, ctx):
    """The tiny value of an integer field, or v unchanged."""
    L = ctx.layers
    if key in _LAYERS:
        return L if v > L else v
    if key in _HIDDEN:
        return HIDDEN if v > 0 else v
    if key in _HEADS:
        return _small(v, HEADS)
    if key in _KV_HEADS:
        heads = next((orig.get(h) for h in ("num_attention_heads", "n_head", "n_heads") if _is_int(orig.get(h))), None)
        if v == 1:
            return 1
        if heads is not None and v == heads:
            return HEADS  # multi-head attention stays multi-head
        return KV_HEADS
    if key in _HEAD_DIM:
        return _small(v, HEAD_DIM)
    if key in _INTERMEDIATE:
        return INTERMEDIATE
    if key in _EXPERT_INTERMEDIATE:
        return EXPERT_INTERMEDIATE
    if key in _EXPERTS:
        return _small(v, EXPERTS)
    if key in _TOP_K:
        return _small(v, TOP_K)
    if key in _RANK:
        return _small(v, RANK)
    if key in _STATE:
        return _small(v, STATE)
    if key in _POSITIONS:
        return MAX_POS if v > MAX_POS else v
    if key in _WINDOWS:
        return _small(v, WINDOW)
    if key in _MISC:
        return _small(v, _MISC[key])
    if key in _INDEXER:
        return _small(v, _INDEXER[key])
    if key in _CHUNKS:
        return _small(v, 4)
    if key in _EXPERT_GROUPS:
        return _small(v, _EXPERT_GROUPS[key])
    if key in _ONE_IF_MORE:
        return _small(v, 1)
    if key in ("moe_layer_end_index",):
        return L - 1
    if "vocab_size" in key and key != "type_vocab_size":
        return _small(v, VOCAB)
    return v


def _layer_lists(d, n_layers):
    """Keys of the per-layer lists of a config dict (lists as long as the layer count)."""
    out = []
    for k, v in d.items():
        if (isinstance(v, (list, tuple)) and len(v) == n_layers and n_layers > 1 and "token" not in k
                and k not in _INDEX_LISTS):
            out.append(k)
    return out


def _choose_layers(d, keys, n_layers, L):
    """Indices of the L layers to keep: greedily the layer showing the most kinds (of any per-layer list)
    not yet kept, earliest first; kept in their order."""
    uncovered = {(k, repr(x)) for k in keys for x in d[k]}
    idx = []
    while len(idx) < min(L, n_layers):
        best = max((i for i in range(n_layers) if i not in idx),
                   key=lambda i: (sum((k, repr(d[k][i])) in uncovered for k in keys), -i))
        idx.append(best)
        uncovered -= {(k, repr(d[k][best])) for k in keys}
    return sorted(idx)


def _index_list(v, n_layers, L):
    if not v:
        return v
    if set(range(n_layers)) <= set(v):
        return list(range(L))
    if 0 in v:
        return [0]
    return [L - 1]


def _derived(cls) -> tuple[set, set]:
    """(fields whose class default is None, attributes that are no field): the config derives them in
    __post_init__ (head_dim from hidden and heads, ...), so that a size that must agree with others is
    left out of the overrides and derived again; so is a layer-index list that is no field."""
    import dataclasses

    try:
        fields = dataclasses.fields(cls)
    except TypeError:
        return set(), set()
    names = {f.name for f in fields} | set(getattr(cls, "attribute_map", {}).values())
    try:
        set_in_post_init = set(cls().to_dict()) - names  # attributes that are no field at all
    except Exception:  # noqa: BLE001
        set_in_post_init = set()
    return {f.name for f in fields if f.default is None}, set_in_post_init


def _overrides(d: dict, ctx: _Ctx, dropout: float, sub=None) -> dict:
    """Overrides that make a config dict tiny (sub: the config object, for its sub-configs)."""
    from transformers import PreTrainedConfig

    none_default, not_field = _derived(type(sub)) if sub is not None else (set(), set())
    derived = none_default | not_field

    L = ctx.layers
    n_layers = next((d[k] for k in ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
                                    "num_decoder_layers") if _is_int(d.get(k))), None)
    per_layer = _layer_lists(d, n_layers) if n_layers else []
    keep = _choose_layers(d, per_layer, n_layers, L) if per_layer else list(range(L))
    out = {}
    for k, v in d.items():
        if k in _META:
            continue
        child = None
        if sub is not None:
            try:
                child = sub._getattr_without_heterogeneous_validation(k) if hasattr(
                    sub, "_getattr_without_heterogeneous_validation") else getattr(sub, k, None)
            except Exception:
                child = None
        if isinstance(child, PreTrainedConfig):
            out[k] = _tiny_subconfig(child, ctx, dropout, ctx.sub_patches.get(k))
            continue
        if isinstance(v, dict) and k not in ("rope_parameters", "rope_scaling", "per_layer_config"):
            new = _overrides(v, ctx, dropout)
            if new:
                out[k] = {**v, **new}
            continue
        if k == "per_layer_config" and isinstance(v, dict):
            new = {}
            for i, layer_kw in v.items():
                if int(i) in keep:
                    j = keep.index(int(i))
                    new[j] = {**layer_kw, **_overrides(layer_kw, ctx, dropout)}
            out[k] = new
            continue
        if _DROPOUT.search(k) and (isinstance(v, float) or _is_int(v)):
            if isinstance(v, float):
                out[k] = float(dropout)
            elif dropout == int(dropout):  # an int-annotated probability; a float one is set by _set_dropouts
                out[k] = int(dropout)
            continue
        if k in _ZERO and (isinstance(v, (int, float)) and not isinstance(v, bool)) and v:
            out[k] = type(v)(0)
            continue
        if k == "is_decoder" and v is False and sub is not None and not d.get("is_encoder_decoder"):
            out[k] = True  # the *ForCausalLM of an encoder family (bert, roberta, ...) is meant as a decoder
            continue
        if k == "num_kv_shared_layers" and _is_int(v) and v:
            out[k] = L if v == n_layers else 0  # all-shared (an assistant) stays all-shared, else none
            continue
        if k in _FALSE and v is True:
            out[k] = False
            continue
        if (k.endswith("token_id") or k.endswith("token_index") or k.endswith("token_ids")) and v is not None:
            new = _token_id(k, v, ctx)
            if new != v:
                out[k] = new
            continue
        if k in per_layer:
            out[k] = [_shrink_int(k, v[i], d, ctx) if _is_int(v[i]) else v[i] for i in keep]
            continue
        if k in _INDEX_LISTS and isinstance(v, (list, tuple)) and n_layers and k not in not_field:
            out[k] = _index_list(v, n_layers, L)
            continue
        if _is_int(v) and not (k in derived and k in _CONSISTENT):
            new = _shrink_int(k, v, d, ctx)
            if new != v:
                out[k] = new
        elif v is None and k in _FILL_NONE:
            out[k] = _FILL_NONE[k]
    return out


def _tiny_subconfig(cfg, ctx, dropout, patch=None):
    """A tiny copy of a sub-config object (its class's defaults, its parent's changes, tiny overrides,
    then the family's patch for this sub-config)."""
    cls = type(cfg)
    d = cfg.to_dict()
    try:
        fresh = cls().to_dict()
    except Exception:
        fresh = {}
    kw = {k: v for k, v in d.items() if k not in _META and fresh.get(k, object()) != v}
    kw.update(_overrides(d, ctx, dropout, sub=cfg))
    _fix_mamba(kw, d)
    _fix_mla(kw, d)
    kw.update(patch or {})
    return cls(**kw)


# mamba-style mixers: (heads field, head-dim field, expand field, inner-size field) that must satisfy
# heads * head_dim == expand * hidden (the inner size, where a family stores it, follows)
_MAMBA_HEADS = (("mamba_n_heads", "mamba_d_head", "mamba_expand", "mamba_d_ssm"),
                ("n_mamba_heads", "mamba_headdim", "mamba_expand", None),
                ("mamba_num_heads", "mamba_head_dim", "expand", None),
                ("num_heads", "head_dim", "expand", None))


def _fix_mamba(kw: dict, base: dict) -> None:
    merged = {**base, **kw}
    hidden = merged.get("hidden_size")
    for heads, dim, expand, inner in _MAMBA_HEADS:
        if not all(_is_int(merged.get(k)) for k in (heads, dim)) or not _is_int(hidden):
            continue
        if heads == "num_heads" and "state_size" not in merged:  # only mamba2's own num_heads/head_dim
            continue
        e = merged.get(expand) if _is_int(merged.get(expand)) else 2
        kw[dim] = e * hidden // merged[heads]
        if inner and _is_int(merged.get(inner)):
            kw[inner] = e * hidden


def _fix_mla(kw: dict, base: dict) -> None:
    """Multi-head latent attention: a head_dim that was the rope part (or rope + nope) stays so."""
    new = {**base, **kw}
    rope, nope, hd = (base.get(k) for k in ("qk_rope_head_dim", "qk_nope_head_dim", "head_dim"))
    if not (_is_int(rope) and _is_int(hd)):
        return
    if hd == rope:
        kw["head_dim"] = new["qk_rope_head_dim"]
    elif _is_int(nope) and hd == rope + nope:
        kw["head_dim"] = new["qk_rope_head_dim"] + new["qk_nope_head_dim"]
    if _is_int(base.get("qk_head_dim")) and _is_int(nope):
        kw["qk_head_dim"] = new["qk_rope_head_dim"] + new["qk_nope_head_dim"]


def _set_dropouts(cfg, p: float) -> None:
    """Every dropout-probability field of the config tree (sub-configs and dict fields too) = p.
    Set after construction, bypassing type checks (some families annotate a probability as int)."""
    from transformers import PreTrainedConfig

    def visit(obj):
        items = obj.to_dict().items() if isinstance(obj, PreTrainedConfig) else list(obj.items())
        for k, v in items:
            if not isinstance(k, str) or k in _META:
                continue
            try:
                cur = obj._getattr_without_heterogeneous_validation(k) if isinstance(obj, PreTrainedConfig) else v
            except Exception:  # noqa: BLE001
                cur = v
            if isinstance(cur, PreTrainedConfig) or isinstance(cur, dict) and k not in ("per_layer_config",):
                visit(cur)
            elif _DROPOUT.search(k) and (isinstance(cur, float) or _is_int(cur)):
                val = p if isinstance(cur, float) or p != int(p) else int(p)
                if isinstance(obj, dict):
                    obj[k] = val
                else:
                    try:
                        setattr(obj, k, val)
                    except Exception:  # noqa: BLE001 - a strict int field: store the float anyway
                        object.__setattr__(obj, k, val)

    visit(cfg)


def _set_eager(cfg) -> None:
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"


def config(family: str, *, dropout: float = 0.0, layers: int = 2):
    """The tiny config of a family (attention and experts eager, no cache, every dropout = dropout).
    For a composite family whose causal LM takes one part (text / decoder config), that part."""
    from transformers import CONFIG_MAPPING, PreTrainedConfig

    patch = PATCHES.get(family, {})
    cls = CONFIG_MAPPING[family]
    with _quiet():
        base = cls(**patch.get("base", {}))
        ctx = _Ctx(layers)
        ctx.sub_patches = patch.get("sub", {})
        base_d = base.to_dict()
        kw = dict(patch.get("base", {}))
        kw.update(_overrides(base_d, ctx, dropout, sub=base))
        _fix_mamba(kw, base_d)
        _fix_mla(kw, base_d)
        fix = patch.get("config")
        if callable(fix):
            kw = fix(kw, layers) or kw
        elif fix:
            kw.update(fix)
        kw["attn_implementation"] = "eager"
        kw["experts_implementation"] = "eager"
        cfg = cls(**kw)
    want = _model_class(family).config_class
    if not isinstance(cfg, want):  # e.g. Llama4Config -> its Llama4TextConfig
        for key in list(getattr(cfg, "sub_configs", {}) or {}):
            sub = getattr(cfg, key, None)
            if isinstance(sub, want):
                cfg = sub
                break
    _set_dropouts(cfg, dropout)
    for fix_ in (patch.get("after"),):
        if fix_:
            fix_(cfg)
    _set_eager(cfg)
    return cfg


def _model_class(family):
    import transformers
    return getattr(transformers, _mapping()[family])


def build(family: str, *, dtype=torch.float64, dropout: float = 0.0, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny random-initialised ``*ForCausalLM`` of ``family`` in eval mode, cast to dtype."""
    with _quiet():
        cfg = config(family, dropout=dropout, layers=layers)
        torch.manual_seed(seed)
        model = _model_class(family)(cfg)
    model.config._attn_implementation = "eager"
    fix = PATCHES.get(family, {}).get("build")
    if fix:
        fix(model)
    model.zoo_family = family  # batch() looks up the family's patch by it
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------

def _special_ids(cfg, out=None):
    """Every token id named in the config tree (kept out of the random text ids)."""
    from transformers import PreTrainedConfig

    out = set() if out is None else out
    for k, v in cfg.to_dict().items():
        if k.endswith(("token_id", "token_index", "token_ids")):
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if _is_int(x):
                    out.add(x)
    for k in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, k, None)
        if isinstance(sub, PreTrainedConfig):
            _special_ids(sub, out)
    return out


def vocab(model) -> int:
    """The vocabulary of the logits (the text / decoder part of a composite config)."""
    return model.config.get_text_config(decoder=True).vocab_size


_vocab = vocab


def batch(model, b: int = 3, t: int = 8, seed: int = 0) -> dict:
    """input_ids (ids in [1, vocab), special ids left out), right-padded attention_mask (row 0 full,
    rows 1.. with 1-3 padding positions), labels (first 2 positions and padding at -100)."""
    family = getattr(model, "zoo_family", model.config.model_type)
    vocab = _vocab(model)
    cfg = model.config
    special = _special_ids(cfg)
    pad = getattr(cfg.get_text_config(), "pad_token_id", None)
    pad = pad if _is_int(pad) and 0 <= pad < vocab else 0
    allowed = torch.tensor([i for i in range(1, vocab) if i not in special])
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(0, len(allowed), (b, t), generator=g)]
    mask = torch.ones(b, t, dtype=torch.long)
    labels = ids.clone()
    labels[:, :2] = -100
    for i in range(1, b):
        n = 1 + (i - 1) % 3
        mask[i, t - n:] = 0
        labels[i, t - n:] = -100
        ids[i, t - n:] = pad
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    extra = PATCHES.get(family, {}).get("batch")
    if extra is not None:
        out = extra(model, out) or out
    return out


# --------------------------------------------------------------------------------------------
# per-family patches, each with its one-line reason ("why"), applied in this order:
#   "base":   kwargs of the family's default config (before shrinking)
#   "config": overrides of the shrunk kwargs, a dict or fn(kwargs, layers) -> kwargs
#   "sub":    {sub-config key: overrides} for a composite config's parts
#   "after":  fn(config) on the final config (after the dropouts are set)
#   "build":  fn(model) on the built model
#   "batch":  fn(model, batch) -> batch (or None, changing it in place)
# --------------------------------------------------------------------------------------------

def _codebook_labels(model, bt):
    bt["labels"] = bt["labels"][..., None]


def _xmod_language(model):
    model.set_default_language("en_XX")


PATCHES: dict[str, dict] = {
    "jamba": {"why": "attention every 8th layer from 4 would leave no attention layer in 2: layer 1 attention and MoE",
              "config": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
                         "expert_layer_offset": 1}},
    "zamba": {"why": "the shared attention block is tied across hybrid layers and fails to tie with just one: "
                     "every layer hybrid (mamba + shared attention)",
              "config": lambda kw, L: {**kw, "layers_block_type": ["hybrid"] * L}},
    "kolibri1_1": {"why": "kv_source_layers / index_layers hold layer indices: left for the config to derive; "
                          "NVFP4 rounding of keys/values needs head_dim 16",
                   "config": lambda kw, L: {**kw, "kv_source_layers": None, "index_layers": None, "head_dim": 16,
                                            "index_num_heads": 2}},
    "qwen4_exp_text": {"why": "the QSA indexer's budget and compression are None by default (from the hub)",
                       "config": {"indexer_budget": 4, "indexer_compress_ratio": 2}},
    "qwen4_exp": {"why": "the QSA indexer's budget and compression are None by default (from the hub)",
                  "sub": {"text_config": {"indexer_budget": 4, "indexer_compress_ratio": 2}}},
    "dbrx": {"why": "the default attn_config lacks rope_theta and has clip_qkv None, which the attention "
                    "cannot run with (the hub's configs set both)",
             "sub": {"attn_config": {"clip_qkv": 8.0}},
             "after": lambda cfg: object.__setattr__(cfg.attn_config, "rope_theta", 10000.0)},
    "lfm2": {"why": "the default config (no full_attn_idxs) is all attention: one conv layer, one attention layer",
             "config": lambda kw, L: {**kw, "layer_types": (["conv", "full_attention"] * L)[:L],
                                      "full_attn_idxs": list(range(1, L, 2))}},
    "bamba": {"why": "the default config (attn_layer_indices None) is all mamba: the last layer attention",
              "config": lambda kw, L: {**kw, "attn_layer_indices": [L - 1]}},
    "granitemoehybrid": {"why": "the default config (layer_types None) is all mamba: the last layer attention",
                         "config": lambda kw, L: {**kw, "layer_types": ["linear_attention"] * (L - 1)
                                                  + ["full_attention"]}},
    "recurrent_gemma": {"why": "block_types (recurrent, recurrent, attention) is cycled: one of each in 2 layers",
                        "config": lambda kw, L: {**kw, "block_types": (["recurrent", "attention"] * L)[:L]}},
    "lfm2_moe": {"why": "default config has layer_types=None (from the hub): one conv layer, one attention layer",
                 "config": lambda kw, L: {**kw, "layer_types": (["conv", "full_attention"] * L)[:L]}},
    "cohere_compass_text": {"why": "default rope_parameters is empty (from the hub) but the rotary reads it per "
                                   "layer type",
                            "config": {"rope_parameters": {"full_attention": {"rope_type": "default",
                                                                              "rope_theta": 10000.0}}}},
    "big_bird": {"why": "block-sparse attention needs more tokens than a test batch has: the model would switch to "
                        "full attention at the first forward, re-creating its attention modules (RNG draws)",
                 "config": {"attention_type": "original_full"}},
    "xlm": {"why": "XLMWithLMHeadModel is bidirectional unless causal=True (as a causal LM here)",
            "config": {"causal": True}},
    "reformer": {"why": "ReformerModelWithLMHead asserts is_decoder=True; the axial position dims must sum to the "
                        "hidden size and the axial shape multiply to the max positions; chunks of 4; a fixed LSH "
                        "hash seed",
                 "config": {"is_decoder": True, "axial_pos_embds_dim": [16, 16], "axial_pos_shape": [8, 8],
                            "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4, "num_buckets": 2,
                            "hash_seed": 0}},
    "xmod": {"why": "the adapters need a language: the default's en_XX",
             "build": _xmod_language},
    "diffllama": {"why": "DiffLlama raises on attention_dropout > 0 (no defined semantics): kept at 0",
                  "after": lambda cfg: setattr(cfg, "attention_dropout", 0.0)},
    "dots1": {"why": "default n_shared_experts is None (from the hub) but the MoE block multiplies by it",
              "config": {"n_shared_experts": 1}},
    "musicgen": {"why": "logits are per codebook ([b*codebooks, t, vocab]): one codebook; labels are "
                        "[b, t, codebooks]",
                 "after": lambda cfg: setattr(cfg, "num_codebooks", 1), "batch": _codebook_labels},
    "musicgen_melody": {"why": "logits are per codebook ([b*codebooks, t, vocab]): one codebook; labels are "
                               "[b, t, codebooks]",
                        "after": lambda cfg: setattr(cfg, "num_codebooks", 1), "batch": _codebook_labels},
    "beam": {"why": "final_logit_softcapping casts the logits to float32 (logits.float()): turned off",
             "config": {"final_logit_softcapping": None}},
    "gemma4_assistant": {"why": "the default config fails its own validation (assistant needs no per-layer input)",
                         "base": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}}},
}


# --------------------------------------------------------------------------------------------
# the static record (refreshed with survey(); transformers 5.25, torch 2.13 CPU)
# --------------------------------------------------------------------------------------------

# every family of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, in its order (families() reads the live mapping)
FAMILIES: tuple[str, ...] = (
    'afmoe', 'apertus', 'apertus1p5_text', 'arcee', 'aria_text', 'axk1', 'axk2', 'bailing_hybrid', 'bamba', 'bart',
    'beam', 'bert', 'bert-generation', 'big_bird', 'bigbird_pegasus', 'biogpt', 'bitnet', 'blenderbot',
    'blenderbot-small', 'bloom', 'blt', 'camembert', 'codegen', 'cohere', 'cohere2', 'cohere2_moe',
    'cohere_compass_text', 'cpmant', 'ctrl', 'cwm', 'data2vec-text', 'dbrx', 'deepseek_v2', 'deepseek_v3',
    'deepseek_v32', 'deepseek_v4', 'diffllama', 'doge', 'dory', 'dots1', 'dots3_note', 'dots3_note_text', 'electra',
    'emu3', 'ergo', 'ernie', 'ernie4_5', 'ernie4_5_moe', 'exaone', 'exaone4', 'exaone_moe', 'falcon', 'falcon_h1',
    'falcon_mamba', 'flex_olmo', 'flint', 'fuyu', 'gemma', 'gemma2', 'gemma3', 'gemma3_text', 'gemma3n',
    'gemma3n_text', 'gemma4', 'gemma4_assistant', 'gemma4_text', 'gemma4_unified', 'gemma4_unified_assistant',
    'gemma4_unified_text', 'git', 'glm', 'glm4', 'glm4_moe', 'glm4_moe_lite', 'glm_moe_dsa', 'got_ocr2', 'gpt-sw3',
    'gpt2', 'gpt_bigcode', 'gpt_neo', 'gpt_neox', 'gpt_neox_japanese', 'gpt_oss', 'gptj', 'granite', 'granite_swa',
    'granitemoe', 'granitemoe_swa', 'granitemoehybrid', 'granitemoeshared', 'helium', 'hrm_text',
    'hunyuan_v1_dense', 'hunyuan_v1_moe', 'hy_v3', 'hy_v4', 'hyperclovax', 'inkling2_loop_text', 'inkling2_text',
    'inkling_text', 'internlm3', 'iquestcoder', 'jais2', 'jamba', 'jetmoe', 'kimi_linear', 'kolibri1', 'kolibri1_1',
    'laguna', 'lara_mini', 'lfm2', 'lfm2_moe', 'lfm3', 'llama', 'llama4', 'llama4_text', 'longcat_flash', 'mamba',
    'mamba2', 'marian', 'mbart', 'megatron-bert', 'mellum', 'mimo_v2_flash', 'minicpm3', 'minicpm5_moe', 'minimax',
    'minimax_m2', 'minimax_m3_vl_text', 'ministral', 'ministral3', 'mistral', 'mixtral', 'mllama',
    'modernbert-decoder', 'moshi', 'moss_transcribe_diarize', 'mpt', 'musicgen', 'musicgen_melody', 'mvp',
    'nanochat', 'nemotron', 'nemotron_h', 'olmo', 'olmo2', 'olmo3', 'olmo_hybrid', 'olmoe', 'openai-gpt', 'opt',
    'param2moe', 'pegasus', 'persimmon', 'phi', 'phi3', 'phi4_multimodal', 'phimoe', 'plbart', 'prophetnet',
    'qwen2', 'qwen2_moe', 'qwen3', 'qwen3_5', 'qwen3_5_moe', 'qwen3_5_moe_text', 'qwen3_5_text', 'qwen3_moe',
    'qwen3_next', 'qwen4_exp', 'qwen4_exp_text', 'recurrent_gemma', 'reformer', 'rembert', 'roberta',
    'roberta-prelayernorm', 'roc_bert', 'roformer', 'rwkv', 'sarvam_mla', 'sarvam_moe', 'seed_oss', 'smollm3',
    'solar_open', 'stablelm', 'starcoder2', 'trocr', 'vaultgemma', 'whisper', 'xglm', 'xlm', 'xlm-roberta',
    'xlm-roberta-xl', 'xlnet', 'xlstm', 'xmod', 'youtu', 'zamba', 'zamba2', 'zaya'
)

# families that cannot be built tiny in float64 and run forward (batch() incl. labels) + backward in eval
# mode and in train mode with dropout 0.1: the exception and why
_F32_LOGITS = "TypeError: logits are float32, not float64: the causal-LM head casts them with .float()"
UNBUILDABLE: dict[str, str] = {
    "blt": _F32_LOGITS,
    "dory": _F32_LOGITS + " (DoryLMHead)",
    "falcon_mamba": _F32_LOGITS,
    "mamba": _F32_LOGITS,
    "mamba2": _F32_LOGITS,
    "mllama": _F32_LOGITS,
    "nemotron_h": _F32_LOGITS,
    "xlstm": _F32_LOGITS,
    "ergo": "TypeError: logits are float32, not float64: the decoder layer casts the residual stream to float32 "
            "(post_attention_layernorm(hidden_states.float()))",
    "inkling2_text": "RuntimeError: expected m1 and m2 to have the same dtype (float != double): the MoE router "
                     "computes hidden_states.float() @ its weight, float64 unsupported",
    "inkling2_loop_text": "RuntimeError: expected m1 and m2 to have the same dtype (float != double): the MoE router "
                          "computes hidden_states.float() @ its weight, float64 unsupported",
    "xglm": "RuntimeError: value cannot be converted to type float without overflow: the attention clamps with "
            "torch.full((), finfo(float64).min) made in float32, float64 unsupported",
    "prophetnet": "FloatingPointError: non-finite logits in float64: its finfo(dtype).min attention masks add up "
                  "to -inf and give NaN once an attention_mask is passed (fine in float32)",
    "gemma3n": "ImportError: TimmWrapperModel requires the timm library (the vision tower), not installed",
    "gemma4_assistant": "ValueError: inputs_embeds and shared_kv_states cannot be None: a drafter that runs on a "
                        "target model's embeddings and KV states, not on input_ids",
    "gemma4_unified_assistant": "ValueError: inputs_embeds and shared_kv_states cannot be None: a drafter that runs "
                                "on a target model's embeddings and KV states, not on input_ids",
    "git": "ValueError: Expected input batch_size (0) to match target batch_size (21): with labels the loss drops "
           "the image tokens' positions, which needs pixel_values (a vision input)",
    "reformer": "AssertionError: backward needs model.train(): the reversible layers' custom backward refuses eval "
                "mode (and in train mode prod(axial_pos_shape) must equal the sequence length)",
}

# what the built tiny model is. moe: a mixture-of-experts block; hybrid: mamba / ssm / linear-attention /
# short-conv / recurrent layers (with or without MoE: see MOE); other: a multimodal wrapper (vision / audio
# towers, patch embedder), a drafter, or a stack that is no plain decoder (byte patches, hierarchical or
# looped recurrence, reversible or n-gram streams, two-stream / prompt-prefixed). The *ForCausalLM of an
# encoder-decoder family (bart, whisper, ...) is its decoder alone and counts as dense.
_KINDS = {
    "moe": """afmoe aria_text axk1 axk2 beam cohere2_moe dbrx deepseek_v2 deepseek_v3 deepseek_v32 deepseek_v4 dots1
        dots3_note dots3_note_text ergo ernie4_5_moe exaone_moe flex_olmo flint glm4_moe glm4_moe_lite glm_moe_dsa
        gpt_oss granitemoe granitemoe_swa granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 inkling2_loop_text
        inkling2_text inkling_text jetmoe kolibri1 kolibri1_1 laguna llama4 llama4_text longcat_flash mellum
        mimo_v2_flash minicpm5_moe minimax_m2 minimax_m3_vl_text mixtral olmoe param2moe phimoe qwen2_moe qwen3_moe
        sarvam_mla sarvam_moe solar_open zaya""",
    "hybrid": """bailing_hybrid bamba falcon_h1 falcon_mamba granitemoehybrid jamba kimi_linear lara_mini lfm2 lfm2_moe
        lfm3 mamba mamba2 minimax nemotron_h olmo_hybrid qwen3_5 qwen3_5_moe qwen3_5_moe_text qwen3_5_text
        qwen3_next qwen4_exp qwen4_exp_text recurrent_gemma rwkv xlstm zamba zamba2""",
    "other": """blt cpmant dory fuyu gemma3 gemma3n gemma4 gemma4_assistant gemma4_unified gemma4_unified_assistant
        git got_ocr2 hrm_text mllama moss_transcribe_diarize phi4_multimodal prophetnet reformer xlnet""",
}
KIND: dict[str, str] = {fam: "dense" for fam in FAMILIES}
KIND.update({fam: kind for kind, names in _KINDS.items() for fam in names.split()})

# every family whose tiny model has a mixture-of-experts block (the moe ones and the hybrids with MoE)
MOE: frozenset[str] = frozenset(_KINDS["moe"].split()) | frozenset(
    "bailing_hybrid granitemoehybrid jamba kimi_linear lara_mini lfm2_moe minimax nemotron_h qwen3_5_moe "
    "qwen3_5_moe_text qwen3_next qwen4_exp qwen4_exp_text".split())

# what a test should know about an ok family (measured in float64, b=3, t=8, eval mode)
_FP32_PADDING = ("float32 internals: a sample's logits change with its trailing padding by ~1e-9 (not with the rest "
                 "of the batch)")
_NO_DROPOUT = "no dropout field: dropout has no effect"
CAVEATS: dict[str, str] = {
    "cpmant": "ignores attention_mask: pads are token 0 and taken as left padding, so right padding changes the "
              "valid positions' logits (they stay independent of the rest of the batch)",
    "doge": "the dynamic-mask attention keeps keys regardless of padding: right padding changes the valid "
            "positions' logits (~1e-1; independent of the rest of the batch)",
    "deepseek_v32": "the DSA indexer's top-k (4 of 8) also ranks padded keys: right padding changes the valid "
                    "positions' logits (~1e-2; independent of the rest of the batch)",
    "glm_moe_dsa": "the DSA indexer's top-k (4 of 8) also ranks padded keys: right padding changes the valid "
                   "positions' logits (~1e-2; independent of the rest of the batch)",
    "kolibri1_1": "NVFP4 fake-quantised keys / float32 routing: a sample's logits depend on the rest of the batch "
                  "by ~1e-8",
    "diffllama": "attention_dropout stays 0 (the family raises on it) and there is no other dropout field",
    **{fam: _NO_DROPOUT for fam in ("ernie4_5", "ernie4_5_moe", "lfm2", "lfm2_moe", "rwkv")},
    **{fam: _FP32_PADDING for fam in ("axk1", "codegen", "deepseek_v3", "deepseek_v4", "flint", "gpt_neo", "gptj",
                                      "hy_v4", "kimi_linear", "laguna", "llama4", "llama4_text", "minimax_m2", "mpt",
                                      "param2moe", "solar_open")},
}


# --------------------------------------------------------------------------------------------
# status and survey
# --------------------------------------------------------------------------------------------

def families() -> tuple[str, ...]:
    """The causal-LM families of the installed transformers (what FAMILIES records)."""
    return tuple(_mapping())


def status(family: str):
    """("ok", None) or ("unbuildable", reason), from the static UNBUILDABLE dict (see survey())."""
    if family not in FAMILIES:
        raise KeyError(f"{family!r} is not a causal-LM family of this zoo")
    if family in UNBUILDABLE:
        return "unbuildable", UNBUILDABLE[family]
    return "ok", None


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _forward_backward(model, bt, b, t, per_sample: bool):
    logits = _logits(model(**bt))
    vocab = _vocab(model)
    if logits.dtype != torch.float64:
        raise TypeError(f"logits are {logits.dtype}, not float64")
    if tuple(logits.shape) != (b, t, vocab):
        raise ValueError(f"logits shape {tuple(logits.shape)} != {(b, t, vocab)}")
    if per_sample:
        for i in range(b):  # per-sample backward passes, as the test suite does
            logits[i].sum().backward(retain_graph=True)
    logits.sum().backward()
    if not torch.isfinite(logits).all():
        raise FloatingPointError("non-finite logits")


def _check(family: str, b: int = 3, t: int = 8) -> tuple[float, float]:
    """Builds family tiny in float64; forward with batch() (labels included) + backward of logits.sum()
    in eval mode (with b per-sample backwards before) and in train mode with dropout 0.1; raises on any
    failure. Returns the seconds of the eval forward + b + 1 backwards: first call, then again."""
    times = []
    for mode, p in (("eval", 0.0), ("train", 0.1)):
        model = build(family, dropout=p)
        if mode == "train":
            model.train()
        bt = batch(model, b, t)
        for _ in range(2 if mode == "eval" else 1):
            t0 = time.perf_counter()
            _forward_backward(model, bt, b, t, per_sample=mode == "eval")
            times.append(time.perf_counter() - t0)
    return times[0], times[1]


_SSM = re.compile(r"Mamba|Mixer|Rwkv|xLSTM|Recurrent|Rglru|DeltaNet|DeltaAttention|LightningAttention|"
                  r"ShortConv\b|GatedDelta|LinearAttention|Ssm|SSM")
_MOE = re.compile(r"Expert|MoE|Moe|Router|TopKGating|MoA\b")


def _kind(model) -> str:
    """A suggestion for KIND from the module classes and config (KIND itself is reviewed by hand)."""
    names = {type(m).__name__ for m in model.modules()}
    cfg = model.config
    if any(getattr(cfg, k, None) is not None for k in ("vision_config", "audio_config")):
        return "other"
    if any(_SSM.search(n) for n in names):
        return "hybrid"
    if any(_MOE.search(n) for n in names):
        return "moe"
    return "dense"


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:200]}"


def survey(families_=None, verbose: bool = True) -> dict:
    """Recomputes UNBUILDABLE (and a KIND suggestion) by running every family's check; prints one
    line per family, the dicts to paste above, and the time of it all."""
    unbuildable, kind, times = {}, {}, {}
    t_all = time.perf_counter()
    for fam in families_ or families():
        t0 = time.perf_counter()
        try:
            with _quiet():
                times[fam] = _check(fam)
                kind[fam] = _kind(build(fam))
            msg = f"ok  forward+backwards {times[fam][0]:.3f}s cold {times[fam][1]:.3f}s warm  [{kind[fam]}]"
        except Exception as e:  # noqa: BLE001 - every failure is a reason to record
            unbuildable[fam] = _reason(e)
            msg = "unbuildable  " + unbuildable[fam]
        if verbose:
            print(f"{fam:26s} {time.perf_counter() - t0:5.2f}s  {msg}", flush=True)
    total = time.perf_counter() - t_all
    if verbose:
        done = set(times) | set(unbuildable)
        newly_ok = sorted(f for f in times if f in UNBUILDABLE)
        newly_bad = sorted(f for f in unbuildable if f not in UNBUILDABLE and f in FAMILIES)
        kinds = sorted(f"{f}: {kind[f]} (static {KIND.get(f)})" for f in kind if kind[f] != KIND.get(f))
        print(f"against the static record: now ok {newly_ok}, now unbuildable {newly_bad}, "
              f"not in FAMILIES {sorted(done - set(FAMILIES))}, missing {sorted(set(families()) - done)}")
        print(f"KIND suggestions that differ from the static KIND (reviewed by hand): {kinds}")
        print("UNBUILDABLE = {")
        for fam, why in unbuildable.items():
            print(f"    {fam!r}: {why!r},")
        print("}")
        print(f"{len(times)} ok, {len(unbuildable)} unbuildable; survey {total:.1f}s; forward + {3 + 1} backwards "
              f"(b=3, t=8, float64): cold max {max((c for c, _ in times.values()), default=0):.3f}s, "
              f"warm max {max((w for _, w in times.values()), default=0):.3f}s")
    return {"unbuildable": unbuildable, "kind": kind, "times": times, "total": total}


class _quiet:
    """Silences transformers' logging and Python warnings (config validation chatter, fallbacks)."""

    def __enter__(self):
        import transformers

        self._level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        import transformers

        self._warnings.__exit__(*exc)
        transformers.logging.set_verbosity(self._level)
        return False


if __name__ == "__main__":
    survey()
