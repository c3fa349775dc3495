"""Per-family knowledge: Hugging Face config -> ModelConfig, and HF weight names <-> the Weights pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import transformers

from cme_jax.errors import CmeError
from cme_jax.models.transformer import LayerWeights, ModelConfig, RopeConfig, Weights

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "olmo2",
)

_GEMMA = ("gemma", "gemma2", "gemma3_text")


def supported_text() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES)


def hf_config_object(hf: Mapping[str, Any] | transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """A transformers config object for a config.json dict (transformers normalises legacy fields)."""
    if isinstance(hf, transformers.PretrainedConfig):
        return hf
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CmeError(f"unsupported architecture {model_type!r}; supported model types: {supported_text()}")
    fields = {k: v for k, v in hf.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(model_type, **fields)


def _rope(params: Mapping[str, Any], where: str) -> RopeConfig:
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta,
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise CmeError(f"{where}: rope_type {kind!r} is not supported (supported: default, linear, llama3)")


def config_from_hf(hf: Mapping[str, Any] | transformers.PretrainedConfig) -> ModelConfig:
    """Translate a Hugging Face config (dict or object) into a ModelConfig."""
    obj = hf_config_object(hf)
    if obj.model_type == "gemma3":
        obj = obj.get_text_config()
    mt = obj.model_type
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CmeError(f"unsupported architecture {mt!r}; supported model types: {supported_text()}")
    if getattr(obj, "mlp_bias", False):
        raise CmeError(f"{mt}: mlp_bias=True is not supported")
    if mt in ("llama", "mistral", "olmo2", "qwen3") and getattr(obj, "attention_bias", False):
        raise CmeError(f"{mt}: attention_bias=True is not supported")
    heads = obj.num_attention_heads
    head_dim = getattr(obj, "head_dim", None) or obj.hidden_size // heads
    rope_params = obj.rope_parameters
    rope_local = None
    if "full_attention" in rope_params:
        rope = _rope(rope_params["full_attention"], mt)
        if "sliding_attention" in rope_params:
            rope_local = _rope(rope_params["sliding_attention"], mt)
    else:
        rope = _rope(rope_params, mt)

    layer_types = getattr(obj, "layer_types", None)
    window = getattr(obj, "sliding_window", None)
    if layer_types:
        kinds = tuple("sliding" if t == "sliding_attention" else "full" for t in layer_types)
    elif window:
        kinds = ("sliding",) * obj.num_hidden_layers
    else:
        kinds = ()
    if "sliding" not in kinds:
        kinds, window = (), None
    elif not window:
        raise CmeError(f"{mt}: layers use sliding attention but sliding_window is not set")

    act = getattr(obj, "hidden_activation", None) or obj.hidden_act
    if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        activation = "gelu_tanh"
    elif act == "silu":
        activation = "silu"
    else:
        raise CmeError(f"{mt}: activation {act!r} is not supported (supported: silu, gelu_pytorch_tanh)")

    gemma = mt in _GEMMA
    placement = "sandwich" if mt in ("gemma2", "gemma3_text") else "post" if mt == "olmo2" else "pre"
    qk_norm = "head" if mt in ("qwen3", "gemma3_text") else "full" if mt == "olmo2" else "none"
    qpas = getattr(obj, "query_pre_attn_scalar", None)
    return ModelConfig(
        family=mt,
        vocab_size=obj.vocab_size,
        dim=obj.hidden_size,
        num_layers=obj.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(obj, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        mlp_dim=obj.intermediate_size,
        norm_eps=float(obj.rms_norm_eps),
        rope=rope,
        rope_local=rope_local,
        norm_placement=placement,
        norm_plus_one=gemma,
        qk_norm=qk_norm,
        qkv_bias=mt == "qwen2",
        activation=activation,
        embed_scale=gemma,
        tie_embeddings=bool(getattr(obj, "tie_word_embeddings", False)),
        attn_scale=float(qpas) ** -0.5 if (qpas and mt != "gemma") else None,
        attn_softcap=getattr(obj, "attn_logit_softcapping", None),
        final_softcap=getattr(obj, "final_logit_softcapping", None),
        sliding_window=window,
        layer_kinds=kinds,
        max_position=int(getattr(obj, "max_position_embeddings", 8192)),
    )


# ----------------------------------------------------------------------------------------------------------
# Weight names


@dataclasses.dataclass(frozen=True)
class HFParam:
    """Where one Weights leaf lives in a HF checkpoint and how to convert it both ways."""

    names: tuple[str, ...]  # one name, or one per layer for stacked leaves
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    stacked: bool


_NORM_NAMES = {
    "pre": {"attn_in_norm": "input_layernorm", "mlp_in_norm": "post_attention_layernorm"},
    "sandwich": {
        "attn_in_norm": "input_layernorm",
        "attn_out_norm": "post_attention_layernorm",
        "mlp_in_norm": "pre_feedforward_layernorm",
        "mlp_out_norm": "post_feedforward_layernorm",
    },
    "post": {"attn_out_norm": "post_attention_layernorm", "mlp_out_norm": "post_feedforward_layernorm"},
}


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def hf_param_map(cfg: ModelConfig, prefix: str = "model.") -> Weights:
    """A Weights pytree whose leaves are HFParam (None where the field is unused)."""
    D, N, K, H = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def per_layer(suffix: str) -> tuple[str, ...]:
        return tuple(f"{prefix}layers.{i}.{suffix}" for i in range(cfg.num_layers))

    def proj_in(heads: int) -> tuple[Callable, Callable]:
        # HF stores [heads*H, D]; ours is [D, heads, H].
        return (lambda w: w.T.reshape(D, heads, H), lambda w: w.reshape(D, heads * H).T)

    def layer(suffix: str, conv: tuple[Callable, Callable] = (_identity, _identity)) -> HFParam:
        return HFParam(per_layer(suffix), conv[0], conv[1], True)

    transpose = (lambda w: w.T, lambda w: w.T)
    fields: dict[str, HFParam | None] = {
        "wq": layer("self_attn.q_proj.weight", proj_in(N)),
        "wk": layer("self_attn.k_proj.weight", proj_in(K)),
        "wv": layer("self_attn.v_proj.weight", proj_in(K)),
        "wo": layer("self_attn.o_proj.weight", (lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T)),
        "w_gate": layer("mlp.gate_proj.weight", transpose),
        "w_up": layer("mlp.up_proj.weight", transpose),
        "w_down": layer("mlp.down_proj.weight", transpose),
    }
    for field, name in _NORM_NAMES[cfg.norm_placement].items():
        fields[field] = layer(f"{name}.weight")
    if cfg.qk_norm != "none":
        fields["q_norm"] = layer("self_attn.q_norm.weight")
        fields["k_norm"] = layer("self_attn.k_norm.weight")
    if cfg.qkv_bias:
        fields["bq"] = layer("self_attn.q_proj.bias", (lambda b: b.reshape(N, H), lambda b: b.reshape(-1)))
        fields["bk"] = layer("self_attn.k_proj.bias", (lambda b: b.reshape(K, H), lambda b: b.reshape(-1)))
        fields["bv"] = layer("self_attn.v_proj.bias", (lambda b: b.reshape(K, H), lambda b: b.reshape(-1)))
    single = lambda name: HFParam((name,), _identity, _identity, False)
    return Weights(
        embed=single(f"{prefix}embed_tokens.weight"),
        layers=LayerWeights(**fields),
        final_norm=single(f"{prefix}norm.weight"),
        lm_head=None if cfg.tie_embeddings else single("lm_head.weight"),
    )


def detect_prefix(names: Mapping[str, Any] | set[str] | list[str]) -> str:
    """The key prefix in front of `embed_tokens.weight` (e.g. 'model.' or 'model.language_model.')."""
    hits = [n for n in names if n.endswith("embed_tokens.weight")]
    if not hits:
        raise CmeError("no '*embed_tokens.weight' tensor found; is this a decoder-only language model checkpoint?")
    return min(hits, key=len)[: -len("embed_tokens.weight")]
