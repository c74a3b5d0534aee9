"""`ShardRuntime`: one shard of a model — its layers, its KV pool, and its forward step. Pure compute: no
sockets, no event loop; the stage process and the offline generator drive it.

Construction reads config.json, builds the shard's modules on the meta device (no memory, no random init),
then allocates each parameter on the target device and fills it from safetensors, reading only this shard's
tensors. The KV pool is allocated last, optionally in memory handed in by the caller (shared memory, or a
CUDA allocation exported over IPC) so the streamer can reach it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stages.batch import SeqChunk, StepPlan, build_plan
from stages.errors import InvalidRequestError, LayerRangeError, ModelLoadError
from stages.kv_cache import KVPool
from stages.layers.attention import CUDNN_ATTENTION_MODES, set_cudnn_attention
from stages.models import load_spec
from stages.models.base import DecoderShard
from stages.models.spec import read_config
from stages.weights import Checkpoint, load_shard, random_fill, random_weights_setting
from streamer.layout import PoolLayout, parse_dtype


@dataclass(frozen=True)
class ShardConfig:
    model_dir: Path
    layers: tuple[int, int] | None = None  # None: the whole model
    num_slots: int = 8
    max_seq_len: int = 2048
    dtype: str = "float32"
    device: str = "cpu"
    cuda_graphs: bool = True  # decode steps replay captured graphs (CUDA only)
    # cuDNN's attention kernels are compiled at run time for each new shape, and loading one waits for the
    # whole device (an NCCL receive included): "all" (default) lets SDPA pick cuDNN anywhere, "decode" keeps
    # prompt chunks on precompiled kernels, "off" never uses it (CUDA only; stages/layers/attention.py)
    cudnn_attention: str = "all"
    range_size: int = 0  # slots per microbatch range for graphs (0 = all slots form one range)
    graph_bucket: int = 256  # a decode graph reads keys up to a multiple of this

    def __post_init__(self) -> None:
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.cudnn_attention not in CUDNN_ATTENTION_MODES:
            raise ValueError(f"cudnn_attention must be one of {', '.join(CUDNN_ATTENTION_MODES)}, "
                             f"got {self.cudnn_attention!r}")


def _materialize(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace meta parameters by uninitialised ones on `device`, keeping their weight loaders."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            new = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)
            new.weight_loader = p.weight_loader  # type: ignore[attr-defined]
            sub._parameters[name] = new


def model_dtype(name: str) -> torch.dtype:
    try:
        return parse_dtype(name)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def pool_layout(config: ShardConfig) -> PoolLayout:
    """The KV pool a shard with this config computes in (known before its weights load)."""
    _, spec = load_spec(Path(config.model_dir))
    a, b = config.layers if config.layers is not None else (0, spec.num_layers)
    return PoolLayout(a, b - a, config.num_slots, config.max_seq_len, spec.num_kv_heads, spec.head_dim,
                      model_dtype(config.dtype))


class ShardRuntime:
    def __init__(self, config: ShardConfig, pool_memory: torch.Tensor | None = None) -> None:
        self.config = config
        self.family, self.spec = load_spec(Path(config.model_dir))
        spec = self.spec
        a, b = config.layers if config.layers is not None else (0, spec.num_layers)
        if not 0 <= a < b <= spec.num_layers:
            raise LayerRangeError(f"layer range [{a}, {b}) is not inside the model's [0, {spec.num_layers})")
        if spec.max_positions and config.max_seq_len > spec.max_positions:
            raise InvalidRequestError(
                f"max_seq_len {config.max_seq_len} exceeds the model's {spec.max_positions} positions"
            )
        self.layers = range(a, b)
        self.dtype = model_dtype(config.dtype)
        try:
            self.device = torch.device(config.device)
        except RuntimeError as e:
            raise ModelLoadError(f"bad device {config.device!r}: {e}") from e
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device cuda requested but no CUDA GPU is available")
        with torch.device("meta"):
            self.shard = DecoderShard(self.family, spec, self.layers)
        _materialize(self.shard, self.device, self.dtype)
        random = random_weights_setting(read_config(Path(config.model_dir)))
        if random is not None:
            self.checkpoint = None
            random_fill(self.shard, int(random.get("seed", 0)), float(random.get("std", 0.02)))
        else:
            self.checkpoint = Checkpoint(Path(config.model_dir))
            load_shard(self.shard, self.checkpoint, self.device)
        self.shard.setup(config.max_seq_len, self.dtype, self.device)
        self.shard.eval()
        self.layout = pool_layout(config)
        self.pool = KVPool(self.layout, pool_memory, self.device)
        self.graphs = None
        if self.device.type == "cuda":
            set_cudnn_attention(config.cudnn_attention)  # process-wide: a stage process runs one shard
        if self.device.type == "cuda" and config.cuda_graphs:
            from stages.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, config.range_size or config.num_slots, config.graph_bucket)

    @property
    def is_first(self) -> bool:
        return self.shard.is_first

    @property
    def is_last(self) -> bool:
        return self.shard.is_last

    def plan(self, chunks: Sequence[SeqChunk]) -> StepPlan:
        return build_plan(
            chunks,
            self.device,
            num_slots=self.layout.num_slots,
            max_seq_len=self.layout.max_seq_len,
            sliding_window=self.spec.sliding_window,
        )

    def check_token_ids(self, ids: Sequence[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id(s) {bad[:5]} outside the vocabulary [0, {self.spec.vocab_size})")

    def embed_input(self, token_ids: Sequence[int],
                    fed: tuple[list[int], list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Validated token ids [N] on the device (first shard's input). fed: (rows, source rows, sampled tokens on
        the device) - token ids[rows] are taken from sampled[source rows] (lookahead), on the device, in order
        with the step that sampled them."""
        self.check_token_ids(token_ids)
        values = list(token_ids)
        if fed is not None:
            values += fed[0] + fed[1]
        if self.device.type == "cuda":  # pinned: a pageable copy first waits for the stream and stages the bytes
            ids = torch.tensor(values, dtype=torch.long, pin_memory=True).to(self.device, non_blocking=True)
        else:
            ids = torch.tensor(values, dtype=torch.long)
        if fed is None:
            return ids
        n, m = len(token_ids), len(fed[0])
        head = ids[:n]
        if m:
            head.index_copy_(0, ids[n : n + m], fed[2].index_select(0, ids[n + m :]))
        return head

    def prepare_graph(self, key: tuple[str, int, int]) -> bool:
        """Capture decode graph `key` (stages/graphs.py) ahead of the step that needs it; False: no graphs here."""
        if self.graphs is None:
            return False
        with torch.cuda.device(self.device):
            self.graphs.prepare(key)
        return True

    def forward(
        self, chunks: Sequence[SeqChunk] | StepPlan, inputs: torch.Tensor, all_logits: bool = False
    ) -> torch.Tensor:
        """Run the shard's layers over one step. See DecoderShard.forward for shapes."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # streams, events and graphs act on the current device
                return self._forward(chunks, inputs, all_logits)
        return self._forward(chunks, inputs, all_logits)

    def _forward(
        self, chunks: Sequence[SeqChunk] | StepPlan, inputs: torch.Tensor, all_logits: bool
    ) -> torch.Tensor:
        if self.graphs is not None and not all_logits and not isinstance(chunks, StepPlan):
            key = self.graphs.key(chunks)
            if key is not None:
                from stages.batch import validate_chunks

                validate_chunks(chunks, self.layout.num_slots, self.layout.max_seq_len)
                if inputs.shape[0] != len(chunks):
                    raise InvalidRequestError(f"step has {len(chunks)} new tokens but {inputs.shape[0]} inputs")
                return self.graphs.run(key, chunks, inputs)
        plan = chunks if isinstance(chunks, StepPlan) else self.plan(chunks)
        if inputs.shape[0] != plan.num_tokens:
            raise InvalidRequestError(f"step has {plan.num_tokens} new tokens but {inputs.shape[0]} inputs")
        return self.shard(inputs, plan, self.pool, all_logits=all_logits)
