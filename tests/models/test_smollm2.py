"""The SmolLM2 loader: architecture facts, tokenizer, fingerprint, dense weights."""

import re

import mlx.core as mx

from tqstore.models import chat_prompt_ids, load_smollm2
from tqstore.models.loader import file_fingerprint
from tqstore.models.smollm2 import smollm2_gguf_path
from tqstore.paged import model_kv_layout


def test_architecture_from_gguf(smollm2):
    args = smollm2.model.args
    assert (args.num_hidden_layers, args.hidden_size, args.num_attention_heads,
            args.num_key_value_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert args.rope_traditional and args.rope_theta == 100000.0
    assert model_kv_layout(smollm2.model) == dict(
        num_layers=30, num_kv_heads=3, key_head_dim=64, value_head_dim=64, sliding_layers=[])
    w = smollm2.model.model.layers[3].self_attn.q_proj.weight
    assert w.dtype == mx.float32 and w.shape == (576, 576)  # dense, not affine-quantized
    assert load_smollm2() is smollm2  # cached per process


def test_tokenizer_specials_and_chat_template(smollm2):
    tok = smollm2.tokenizer
    assert tok.eos_token_id == 2
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    ids = chat_prompt_ids(tok, "What is the capital of France?")
    assert ids[0] == 1 and ids.count(2) == 2 and ids[-3:] == tok.encode("assistant\n")[-3:]
    assert tok.decode(ids).endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                    "<|im_start|>assistant\n")
    text = "Hello, world! 2026 costs $12.50"
    assert tok.decode(tok.encode(text)) == text
    digits = tok.encode("12345")
    assert len(digits) == 5  # smollm pre-tokenizer: one piece per digit


def test_fingerprint_is_sha256_of_the_file(smollm2):
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", smollm2.fingerprint)
    assert smollm2.fingerprint == file_fingerprint(smollm2_gguf_path())
