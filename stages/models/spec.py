"""`ModelSpec`: the parts of a Hugging Face config.json the runtime needs, normalised across families, and the
layer split of a pipeline.

Reads the raw JSON (never imports a model class from transformers), so both the older `rope_scaling` /
`rope_theta` keys and the newer `rope_parameters` form are understood. Torch-free on purpose: the supervisor
checks a model (and a layer split) before it starts any process, and must not pay torch's import for it. The
family modules (llama.py, opt.py, bloom.py) hold the torch side and name their parser here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.errors import LayerRangeError, ModelLoadError, UnsupportedArchitectureError

# Hugging Face activation names the layers implement (stages/layers/activations.py maps each to a function)
ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int  # 0 = no limit from the architecture (rotary, ALiBi)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    tie_word_embeddings: bool
    sliding_window: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # family-specific knobs

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({e})") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return raw


def eos_ids(raw: Mapping[str, Any], model_dir: Path | None = None) -> tuple[int, ...]:
    """EOS ids from config.json, widened by generation_config.json where present (as HF generate does)."""
    ids: list[int] = []
    sources: list[Any] = [raw.get("eos_token_id")]
    if model_dir is not None:
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            try:
                sources.insert(0, json.loads(gen.read_text()).get("eos_token_id"))
            except (OSError, ValueError):
                pass
    for value in sources:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
        if ids:
            break
    return tuple(ids)


def rope_settings(raw: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling dict or None, partial_rotary_factor) from either config style."""
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping):
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = dict(params) if params.get("rope_type", "default") != "default" else None
        partial = float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
        return theta, scaling, partial
    theta = float(raw.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    partial = float(raw.get("partial_rotary_factor", 1.0))
    return theta, (dict(scaling) if isinstance(scaling, Mapping) else None), partial


def required(raw: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in raw and raw[k] is not None:
            return raw[k]
    raise ModelLoadError(f"config.json lacks {' / '.join(keys)}")


INDEX_FILE = "model.safetensors.index.json"
RANDOM_WEIGHTS_KEY = "dejavu_random_weights"  # benchmark models: no weight files (stages/weights.py)


def weight_files(model_dir: Path) -> list[str]:
    """The directory's safetensors files when it has no index (with one, the index names them). ModelLoadError
    when there are none, saying why: pickle checkpoints (*.bin, *.pt) are never loaded."""
    d = Path(model_dir)
    files = sorted(p.name for p in d.glob("*.safetensors"))
    if files or (d / INDEX_FILE).is_file():
        return files
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise ModelLoadError(f"{d}: only pickle checkpoints (*.bin/*.pt) found; convert them to safetensors "
                             "(pickles are never loaded)")
    raise ModelLoadError(f"{d}: no *.safetensors files")


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise UnsupportedArchitectureError(f"activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")


def split_layers(num_layers: int, stages: int, head_layers: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per stage. head_layers = 0: as even as possible, earlier stages taking the
    remainder. head_layers > 0: the last stage's LM head costs that many layers (a decode step reads its weights as
    it reads a layer's), and the split minimizes the largest stage's cost - the pipeline runs at its slowest stage -
    giving the last stage fewer layers where that lowers it (ties keep the even split)."""
    if not 1 <= stages <= num_layers:
        raise LayerRangeError(f"cannot split {num_layers} layers into {stages} stages (need 1 <= stages <= layers)")
    if head_layers < 0:
        raise ValueError(f"head_layers must be >= 0, got {head_layers}")
    last = num_layers // stages  # the even split's last stage
    if stages > 1 and head_layers > 0:
        def worst(k: int) -> float:  # the slowest stage with k layers on the last: the others split evenly
            return max(-(-(num_layers - k) // (stages - 1)), k + head_layers)

        last = min(range(last, 0, -1), key=lambda k: (worst(k), -k))
    base, extra = divmod(num_layers - last, stages - 1) if stages > 1 else (0, 0)
    sizes = [base + (1 if i < extra else 0) for i in range(stages - 1)] + [last]
    out, a = [], 0
    for n in sizes:
        out.append((a, a + n))
        a += n
    return out


def parse_llama(raw: dict[str, Any], model_dir: Path) -> ModelSpec:
    arch = raw["architectures"][0]
    hidden = int(required(raw, "hidden_size"))
    heads = int(required(raw, "num_attention_heads"))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    theta, scaling, partial = rope_settings(raw)
    is_qwen = raw.get("model_type") == "qwen2" or arch.startswith("Qwen2")
    window = None
    if arch.startswith("Mistral"):
        window = raw.get("sliding_window")
    elif is_qwen and raw.get("use_sliding_window"):
        raise UnsupportedArchitectureError("Qwen2 with use_sliding_window=true is not supported")
    attention_bias = bool(raw.get("attention_bias", False))
    options = {
        "qkv_bias": True if is_qwen else attention_bias,
        "o_bias": False if is_qwen else attention_bias,
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rot_dim": int(head_dim * partial),
        "hidden_act": raw.get("hidden_act", "silu"),
    }
    check_activation(options["hidden_act"])  # fail early on an unknown activation
    return ModelSpec(
        architecture=arch,
        family="llama",
        vocab_size=int(required(raw, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(required(raw, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(required(raw, "intermediate_size")),
        max_positions=0,
        eos_token_ids=eos_ids(raw, model_dir),
        bos_token_id=raw.get("bos_token_id"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window else None,
        options=options,
    )


def parse_opt(raw: dict[str, Any], model_dir: Path) -> ModelSpec:
    hidden = int(required(raw, "hidden_size"))
    heads = int(required(raw, "num_attention_heads"))
    pre = bool(raw.get("do_layer_norm_before", True))
    options = {
        "pre_norm": pre,
        "final_norm": pre and not raw.get("_remove_final_layer_norm", False),
        "proj_dim": int(raw.get("word_embed_proj_dim") or hidden),
        "bias": bool(raw.get("enable_bias", True)),
        "affine": bool(raw.get("layer_norm_elementwise_affine", True)),
        "act": raw.get("activation_function", "relu"),
    }
    check_activation(options["act"])
    return ModelSpec(
        architecture=raw["architectures"][0],
        family="opt",
        vocab_size=int(required(raw, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(required(raw, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(required(raw, "ffn_dim")),
        max_positions=int(required(raw, "max_position_embeddings")),
        eos_token_ids=eos_ids(raw, model_dir),
        bos_token_id=raw.get("bos_token_id"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        options=options,
    )


def parse_bloom(raw: dict[str, Any], model_dir: Path) -> ModelSpec:
    hidden = int(required(raw, "hidden_size", "n_embed"))
    heads = int(required(raw, "n_head", "num_attention_heads"))
    return ModelSpec(
        architecture=raw["architectures"][0],
        family="bloom",
        vocab_size=int(required(raw, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(required(raw, "n_layer", "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,
        max_positions=0,
        eos_token_ids=eos_ids(raw, model_dir),
        bos_token_id=raw.get("bos_token_id"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        options={
            "eps": float(raw.get("layer_norm_epsilon", 1e-5)),
            "post_ln_residual": bool(raw.get("apply_residual_connection_post_layernorm", False)),
        },
    )


PARSERS: dict[str, Callable[[dict[str, Any], Path], ModelSpec]] = {
    "llama": parse_llama, "opt": parse_opt, "bloom": parse_bloom,
}
ARCHITECTURES: dict[str, str] = {  # Hugging Face architecture -> family
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "llama",
    "OPTForCausalLM": "opt", "BloomForCausalLM": "bloom",
}


def read_spec(model_dir: Path) -> ModelSpec:
    """The spec of the model in `model_dir` (config.json, generation_config.json); ModelLoadError if unusable."""
    raw = read_config(model_dir)
    archs = raw.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(f"{model_dir}/config.json names no architecture")
    family = ARCHITECTURES.get(archs[0])
    if family is None:
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return PARSERS[family](raw, Path(model_dir))
