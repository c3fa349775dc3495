"""GGUF files as Hugging Face checkpoints: config.json fields from metadata, HF-named dequantised tensors."""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from cme_jax.errors import CmeError

_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "olmo2": "olmo2",
}

_LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    qtype: int
    offset: int  # absolute byte offset in the file


class _Reader:
    """Minimal GGUF v2/v3 parser: metadata and tensor table, skipping large string arrays cheaply."""

    def __init__(self, path: Path):
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.mv = memoryview(self.buf)
        self.pos = 0
        if bytes(self.mv[:4]) != _MAGIC:
            raise ValueError("missing GGUF magic number")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", self.mv, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        self.pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (ndim,) = self._unpack("<I")
            dims = self._unpack(f"<{ndim}Q")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, tuple(int(d) for d in dims), int(qtype), int(offset)))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self.pos // align) * align
        self.tensors = {n: _TensorInfo(n, d, q, start + o) for n, d, q, o in infos}

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.mv, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        s = bytes(self.mv[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._unpack("<IQ")
            if itype == _STRING:
                if count > 4096:  # vocabularies: skip, the tokenizer is built by transformers
                    for _ in range(count):
                        (n,) = self._unpack("<Q")
                        self.pos += n
                    return None
                return [self._string() for _ in range(count)]
            if itype == _ARRAY:
                raise ValueError("nested GGUF arrays are not supported")
            fmt = _SCALARS[itype]
            arr = np.frombuffer(self.mv, dtype=np.dtype(fmt), count=count, offset=self.pos)
            self.pos += arr.nbytes
            return arr
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        (v,) = self._unpack(_SCALARS[vtype])
        return v

    @staticmethod
    def layout(info: _TensorInfo) -> tuple[int, int]:
        """(rows, bytes per row) of a tensor's storage."""
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.qtype)]
        return math.prod(info.dims[1:]), info.dims[0] // block * type_size

    def raw(self, info: _TensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [rows, row_bytes] (the layout gguf.quants.dequantize expects)."""
        rows, row_bytes = self.layout(info)
        return self.buf[info.offset : info.offset + rows * row_bytes].reshape(rows, row_bytes)


def _open(path: Path) -> _Reader:
    if not path.exists():
        raise CmeError(f"GGUF file {path} does not exist")
    try:
        reader = _Reader(path)
    except Exception as e:
        raise CmeError(f"cannot read GGUF file {path} ({e}); it may be truncated or not a GGUF file") from None
    try:
        end = max((t.offset + math.prod(reader.layout(t)) for t in reader.tensors.values()), default=0)
    except (KeyError, ValueError):
        end = 0  # an unknown quantisation type is reported when that tensor is read
    if end > reader.buf.shape[0]:
        raise CmeError(f"GGUF file {path} is truncated; download it again")
    return reader


def _field(reader: _Reader, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


class GGUFStore:
    """A TensorStore over a GGUF file: HF tensor names and layouts, dequantised to float32 on read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _open(self.path)
        arch = _field(self.reader, "general.architecture")
        if arch not in _MODEL_TYPES:
            raise CmeError(
                f"{self.path}: GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(sorted(_MODEL_TYPES))})"
            )
        self.arch = arch
        self.model_type = _MODEL_TYPES[arch]
        self._tensors = self.reader.tensors
        if "rope_freqs.weight" in self._tensors:
            raise CmeError(
                f"{self.path}: GGUF files with precomputed rope_freqs (Llama 3.1+ long-context scaling) are not "
                "supported; load the safetensors checkpoint instead"
            )
        self._names = {self._hf_name(n): n for n in self._tensors if self._hf_name(n) is not None}
        self.hf_config = self._config()

    def _hf_name(self, name: str) -> str | None:
        if name == "token_embd.weight":
            return "model.embed_tokens.weight"
        if name == "output_norm.weight":
            return "model.norm.weight"
        if name == "output.weight":
            return "lm_head.weight"
        if not name.startswith("blk."):
            return None
        _, idx, rest = name.split(".", 2)
        if rest == "ffn_norm.weight":
            # The same GGUF name is the pre-MLP norm in every family; HF names it per family.
            hf = (
                "pre_feedforward_layernorm.weight"
                if self.arch in ("gemma2", "gemma3")
                else "post_attention_layernorm.weight"
            )
        else:
            hf = _LAYER_NAMES.get(rest)
        return None if hf is None else f"model.layers.{idx}.{hf}"

    def _config(self) -> dict[str, Any]:
        a = self.arch
        g = lambda key, default=None: _field(self.reader, f"{a}.{key}", default)
        heads = int(g("attention.head_count"))
        dim = int(g("embedding_length"))
        head_dim = int(g("attention.key_length", dim // heads))
        layers = int(g("block_count"))
        vocab = int(self._tensors["token_embd.weight"].dims[-1])
        theta = float(g("rope.freq_base", 10000.0))
        scaling = g("rope.scaling.type")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
        if scaling == "linear":
            rope = {"rope_type": "linear", "rope_theta": theta, "factor": float(g("rope.scaling.factor"))}
        elif scaling not in (None, "none"):
            raise CmeError(f"{self.path}: GGUF rope scaling {scaling!r} is not supported (supported: linear)")
        cfg: dict[str, Any] = {
            "model_type": self.model_type,
            "vocab_size": vocab,
            "hidden_size": dim,
            "intermediate_size": int(g("feed_forward_length")),
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": int(g("attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "max_position_embeddings": int(g("context_length", 8192)),
            "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "rope_parameters": rope,
        }
        for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            v = _field(self.reader, f"tokenizer.ggml.{key}")
            if v is not None:
                cfg[hf_key] = int(v)
        pad = _field(self.reader, "tokenizer.ggml.padding_token_id")
        if pad is not None:
            cfg["pad_token_id"] = int(pad)
        if a in ("gemma2", "gemma3"):
            # llama.cpp's rule: the 27B models scale queries by hidden/heads, the others by head_dim.
            big = layers in (46, 62)
            cfg["query_pre_attn_scalar"] = dim // heads if big else head_dim
            cfg["sliding_window"] = int(g("attention.sliding_window", 4096))
            cfg["hidden_activation"] = "gelu_pytorch_tanh"
        if a == "gemma2":
            cfg["attn_logit_softcapping"] = g("attn_logit_softcapping")
            cfg["final_logit_softcapping"] = g("final_logit_softcapping")
            cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        if a == "gemma3":
            cfg["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
            cfg["rope_parameters"] = {
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            }
        if a == "gemma":
            cfg["hidden_act"] = "gelu_pytorch_tanh"
        return cfg

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self._tensors[self._names[name]].dims))

    def get(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[self._names[name]]
        try:
            qtype = gguf.GGMLQuantizationType(t.qtype)
            arr = gguf.quants.dequantize(self.reader.raw(t), qtype)
        except (NotImplementedError, ValueError, KeyError):
            raise CmeError(
                f"{self.path}: tensor {t.name} uses GGUF type {t.qtype}, which cannot be dequantised here; "
                "use a file quantised with Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q5_K/Q6_K or F16/F32"
            ) from None
        arr = np.asarray(arr, dtype=np.float32).reshape(self.shape(name))
        if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.hf_config["num_attention_heads"] if "q_proj" in name else self.hf_config["num_key_value_heads"]
            arr = _unpermute_rotary(arr, heads)
        if self.arch.startswith("gemma") and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's effective scale 1 + w; HF stores w.
            arr = arr - 1.0
        return arr


def _unpermute_rotary(w_OxI: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of rotary pairs in Llama Q/K rows, back to HF's half-split layout."""
    rows = w_OxI.shape[0]
    half = rows // heads // 2
    return w_OxI.reshape(heads, half, 2, *w_OxI.shape[1:]).swapaxes(1, 2).reshape(w_OxI.shape)


def gguf_tokenizer(path: Path):
    """A transformers tokenizer built from the vocabulary inside a GGUF file (slow for large vocabularies)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CmeError(f"cannot build a tokenizer from {path} ({e})") from None
