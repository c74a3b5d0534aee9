"""Tiny random Hugging Face models, built in the test and saved as real model directories (no downloads).

Random models at default init repeat one token forever; scaling the block weights up (x8) makes outputs vary,
so a broken cache or position shows up as a different token.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

BLOCK_SCALE = 8.0
SCALE_OVERRIDES = {"bloom": 16.0}  # BLOOM's embedding LayerNorm needs more to keep its outputs varied


def _scale_blocks(model: torch.nn.Module, scale: float) -> None:
    """Scale block matrices; give norms and biases random values (HF inits them to 1 and 0, which would
    hide a bias or norm weight that never got loaded)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_block = any(tag in name for tag in (".layers.", ".h."))
            if is_block and p.dim() == 2:
                p.mul_(scale)
            elif p.dim() == 1:
                is_weight = name.endswith("weight")
                p.copy_((1.0 if is_weight else 0.0) + (0.3 if is_weight else 0.02) * torch.randn_like(p))


def _save(model: transformers.PreTrainedModel, path: Path, max_shard_size: str | None = None) -> Path:
    model.eval()
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path


CONFIGS = {
    # GQA (6 heads over 2 KV heads), explicit head_dim != hidden/heads, Llama-3 rope scaling, untied head
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=211, hidden_size=72, intermediate_size=100, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        rope_theta=500.0, bos_token_id=1, eos_token_id=2,
    ),
    # sliding window shorter than the longest test prompt, GQA 4:1
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=203, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=256, sliding_window=12, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    ),
    # q/k/v bias, tied embeddings, 3 layers would be too few: 5 (odd) layers
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=197, hidden_size=48, intermediate_size=88, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=199, hidden_size=64, ffn_dim=120, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    # OPT-350m style: post-norm and a projected embedding
    "opt_postnorm": lambda: transformers.OPTConfig(
        vocab_size=199, hidden_size=64, ffn_dim=120, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=40, do_layer_norm_before=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    # a vocabulary whose LM head weighs ~8 layers (a 128k-vocabulary model's head against its layers, scaled down):
    # --layer-split balanced gives the last of 2 stages 1 layer of 4
    "llama_bighead": lambda: transformers.LlamaConfig(
        vocab_size=4099, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    ),
    # 6 heads: not a power of two, exercises the extra ALiBi slopes
    "bloom": lambda: transformers.BloomConfig(
        vocab_size=211, hidden_size=72, n_layer=4, n_head=6, bos_token_id=1, eos_token_id=2,
    ),
}

MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "llama_bighead": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "opt": transformers.OPTForCausalLM,
    "opt_postnorm": transformers.OPTForCausalLM,
    "bloom": transformers.BloomForCausalLM,
}


def build(name: str, path: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Save the tiny `name` model under `path` and return it."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    model = MODEL_CLASSES[name](config)
    _scale_blocks(model, SCALE_OVERRIDES.get(name, BLOCK_SCALE))
    return _save(model, Path(path), max_shard_size)


def load_hf(path: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model
