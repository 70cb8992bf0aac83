"""The inputs of tools/serve_gpu_bench.py: a random-weight Llama-shaped mlx-lm model directory
(config.json, bf16 safetensors shards with an index, the bundled SmolLM2's tokenizer files, so
the vocabulary is SmolLM2's 49,152; written once per (shape, seed): a marker file says what is
there), and distinct random-text prompts of an exact token length."""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, intermediate_size=14336),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, intermediate_size=512),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
LAYERS_PER_SHARD = 8
MARKER = "serve_gpu_bench.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def emit(report: dict, path: str | None) -> None:
    """Print a benchmark's JSON report, and write it to path if given."""
    print(json.dumps(report, indent=1))
    if path:
        Path(path).write_text(json.dumps(report, indent=1))


def model_config(shape: str, vocab: int, tok_config: dict) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPES[shape],
           "vocab_size": vocab, "rope_theta": 500000.0, "rope_traditional": False,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
           "torch_dtype": "bfloat16"}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if k in tok_config:
            cfg[k] = tok_config[k]
    return cfg


def write_model(out: Path, shape: str, seed: int = 0) -> Path:
    """The random-weight model directory at ``out`` (kept if its marker matches)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from tqstore.models.export import bundled_model_dir

    # format 2: max_position_embeddings 131072 (was 16384, which capped the serving endpoint's
    # prompts: it refuses a request past the model's context).
    marker = {"shape": shape, "seed": seed, "dtype": "bfloat16", "std": 0.02, "format": 2}
    if (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == marker:
        log(f"model directory {out} is current")
        return out
    t0 = time.perf_counter()
    smol = bundled_model_dir()
    smol_cfg = json.loads((smol / "config.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (smol / name).is_file():
            shutil.copy2(smol / name, out / name)
    cfg = model_config(shape, int(smol_cfg["vocab_size"]), smol_cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    # The model's parameter names and shapes; MLX is lazy, so its own init is never computed.
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
    del model

    def group(name: str) -> int:
        if name.startswith("model.layers."):
            return 1 + int(name.split(".")[2]) // LAYERS_PER_SHARD
        return 0  # embedding, final norm, lm_head

    groups = sorted({group(k) for k in shapes})
    n = len(groups)
    key = mx.random.key(seed)
    weight_map, total = {}, 0
    for i, g in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        arrays = {}
        for name in sorted(k for k in shapes if group(k) == g):
            key, sub = mx.random.split(key)
            if name.endswith("norm.weight"):
                arrays[name] = mx.ones(shapes[name], dtype=mx.bfloat16)
            else:
                arrays[name] = mx.random.normal(shapes[name], dtype=mx.bfloat16, scale=0.02,
                                                key=sub)
            weight_map[name] = fname
        mx.eval(arrays)
        total += sum(a.nbytes for a in arrays.values())
        mx.save_safetensors(str(out / fname), arrays, metadata={"format": "mlx"})
        del arrays
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / MARKER).write_text(json.dumps(marker))
    log(f"wrote {out}: {total / 2**30:.2f} GiB of bf16 weights in {n} shards, "
        f"{time.perf_counter() - t0:.1f} s")
    return out


# --- prompts -------------------------------------------------------------------------------

def ascii_ids(tokenizer) -> list[int]:
    """Token ids that decode alone to printable ASCII (no special or partial-byte tokens)."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        s = tokenizer.decode([i])
        if s and s.isascii() and s.isprintable():
            out.append(i)
    return out


def messages(text: str) -> list[dict[str, str]]:
    """The request's messages: its tag line as the system message (else SmolLM2's template
    adds the same default system prompt to every request, a shared prefix of a block or two),
    the random text as the user message."""
    tag, _, body = text.partition("\n")
    return [{"role": "system", "content": tag}, {"role": "user", "content": body}]


def chat_len(tokenizer, text: str) -> int:
    ids = tokenizer.apply_chat_template(messages(text), add_generation_prompt=True,
                                        tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def make_prompt(tokenizer, pool: list[int], tag: str, target: int, rng: random.Random) -> str:
    """``tag``'s line (the system message) and random tokens (the user message) whose chat
    prompt is ~``target`` tokens: no two prompts share more than the template's first tokens."""
    head = f"Request {tag}.\n"
    n = max(8, target - 20)
    ids = [rng.choice(pool) for _ in range(n)]
    text = head + tokenizer.decode(ids)
    for _ in range(4):  # re-tokenization merges across boundaries: converge on the length
        have = chat_len(tokenizer, text)
        if abs(have - target) <= max(4, target // 200):
            break
        body = tokenizer.encode(text[len(head):], add_special_tokens=False)
        want = len(body) + (target - have)
        if want > len(body):
            body += [rng.choice(pool) for _ in range(want - len(body))]
        text = head + tokenizer.decode(body[:max(8, want)])
    return text
