"""The embedded default model: a deterministic tiny Llama with a byte-level tokenizer, written on first use.

Random weights from a fixed seed (drawn with our own generator in a fixed order, so they do not change when
transformers changes its init), saved as a real Hugging Face directory: config.json, model.safetensors,
generation_config.json, tokenizer.json + tokenizer_config.json. Nothing is downloaded. Concurrent first
uses (several stage processes starting at once) are safe: each writes a private temporary directory and
renames it into place; the loser of the race discards its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bus.text import byte_unicode

if TYPE_CHECKING:
    import torch

VERSION = "v1"
SEED = 20240301
# ids 0..2 are special, 3..258 are the 256 bytes
SPECIALS = ("<pad>", "<s>", "</s>")
VOCAB = len(SPECIALS) + 256
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 640,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}
BLOCK_SCALE = 8.0  # as in the tests: unscaled random models repeat one token forever


def default_model_dir(cache_dir: Path) -> Path:
    """Path of the default model under `cache_dir`, writing it there first if absent."""
    target = Path(cache_dir) / f"default-llama-{VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-", dir=target.parent))
    try:
        write_default_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _weights() -> dict[str, torch.Tensor]:
    import torch  # only when the model is written: finding it (every start) stays torch-free

    c = CONFIG
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes.update({
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (VOCAB, h)
    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            scale = BLOCK_SCALE if ".layers." in name else 1.0
            out[name] = torch.randn(shape, generator=gen) * (0.02 * scale)
    # Only printable ASCII (and EOS, rarely) gets a head row, so the demo's random text stays readable.
    keep = torch.zeros(VOCAB, 1)
    keep[len(SPECIALS) + 0x20 : len(SPECIALS) + 0x7F] = 1.0
    keep[2] = 0.5  # </s>: possible, not frequent
    out["lm_head.weight"] = out["lm_head.weight"] * keep
    return out


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = byte_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b in range(256):
        vocab[byte_chars[b]] = len(SPECIALS) + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }, indent=2))


def write_default_model(path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(_weights(), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    _write_tokenizer(path)
