"""A Hugging Face fast tokenizer rebuilt from GGUF metadata (no hub, no tokenizer.json).

SmolLM2's GGUF carries a GPT-2 byte-level BPE: ``tokenizer.ggml.tokens`` (id -> token string),
``tokenizer.ggml.merges`` ("a b" pairs, in rank order) and ``tokenizer.ggml.pre = smollm``, the
GPT-2 split regex with every digit its own piece. The first 17 tokens are special
(<|endoftext|>, <|im_start|>=1, <|im_end|>=2, ...) and must be registered as special tokens, or
"<|im_start|>" in a chat prompt is split into ordinary pieces.
"""

from __future__ import annotations

from typing import Any, Mapping

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from tqstore.errors import InvalidArgument

NUM_SPECIAL_TOKENS = 17


def _meta_int(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    return None if value is None else int(value.item() if hasattr(value, "item") else value)


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> PreTrainedTokenizerFast:
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise InvalidArgument(f"unsupported GGUF tokenizer {metadata.get('tokenizer.ggml.model')!r}")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if metadata.get("tokenizer.ggml.pre") == "smollm":
        split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(split)
    tk.decoder = decoders.ByteLevel()
    specials = tokens[:NUM_SPECIAL_TOKENS]
    eos = tokens[_meta_int(metadata, "tokenizer.ggml.eos_token_id") or 0]
    bos_id = _meta_int(metadata, "tokenizer.ggml.bos_token_id")
    pad_id = _meta_int(metadata, "tokenizer.ggml.padding_token_id")
    unk_id = _meta_int(metadata, "tokenizer.ggml.unknown_token_id")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token=eos,
        bos_token=None if bos_id is None else tokens[bos_id],
        pad_token=None if pad_id is None else tokens[pad_id],
        unk_token=None if unk_id is None else tokens[unk_id],
        additional_special_tokens=[t for t in specials if t != eos],
        clean_up_tokenization_spaces=False,
    )
    template = metadata.get("tokenizer.chat_template")
    if template:
        hf.chat_template = template
    return hf
