"""`StageCore`: what a pipeline stage does with one step, without sockets or an event loop.

Takes a `StepRequest` (chunks, token ids, sampling) plus the hidden states from upstream, runs the shard,
and returns either hidden states for the next stage or — on the last stage — one sampled token per chunk.
Runs on the stage process's compute thread; the process shell (stages/proc.py) moves messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bus.messages import StepRequest, TensorMeta, TokenLogprob
from stages.batch import SeqChunk
from stages.errors import InvalidRequestError, StepVoid
from stages.layers.sampling import SamplingParams, penalize, sample, token_logprobs
from stages.penalties import OutputCounts
from stages.runtime import ShardConfig, ShardRuntime


@dataclass(frozen=True)
class Pending:
    """A step's sampled tokens on their way to the host: read() waits for that step only (its event), not for
    the steps launched after it."""

    host: torch.Tensor
    event: torch.cuda.Event | None  # None: `host` holds them already (CPU)

    def read(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass(frozen=True)
class StepOutput:
    hidden: torch.Tensor | None  # [N, hidden] for the next stage
    tokens: list[int] | None  # last stage: one token per chunk
    sent: TensorMeta | None = None  # the hidden states already went downstream over NCCL
    logprobs: list[TokenLogprob | None] | None = None  # last stage: one per chunk when any chunk asked, else None
    pending: Pending | None = None  # last stage, run(defer=True) without logprobs: the tokens, read later


class StageCore:
    def __init__(self, config: ShardConfig, pool_memory: torch.Tensor | None = None) -> None:
        self.runtime = ShardRuntime(config, pool_memory)
        # microbatch -> (epoch, step, its sampled tokens on the device): what a lookahead step feeds back
        self.samples: dict[int, tuple[int, int, torch.Tensor]] = {}
        # last stage, penalties: what each (logical) slot generated and its counts (made at the first penalized step)
        self.outputs: OutputCounts | None = None

    def run(self, step: StepRequest, hidden: torch.Tensor | None, defer: bool = False,
            logical: StepRequest | None = None) -> StepOutput:
        """One step. defer: a last stage returns its tokens as `pending` (copied to pinned host memory behind the
        step, unless a chunk asked for logprobs), so its caller can launch more work before it reads them.
        logical: the step as the controller sent it, where `step` is it in a swapping stage's frame (its slots)."""
        rt = self.runtime
        chunks = [SeqChunk(c.slot, c.start, c.length) for c in step.chunks]
        if len(step.sampling) != len(chunks):
            raise InvalidRequestError(f"{len(chunks)} chunks but {len(step.sampling)} sampling entries")
        if rt.is_first:
            if len(step.token_ids) != sum(c.length for c in chunks):
                raise InvalidRequestError("token_ids do not match the chunks' lengths")
            inputs = rt.embed_input(step.token_ids, self._fed(step, chunks) if step.fed else None)
        else:
            n, width = sum(c.length for c in chunks), rt.spec.hidden_size
            if hidden is None or tuple(hidden.shape) != (n, width) or not hidden.is_floating_point():
                got = None if hidden is None else (tuple(hidden.shape), hidden.dtype)
                raise InvalidRequestError(f"expected hidden states [{n}, {width}], got {got}")
            inputs = hidden.to(rt.device, rt.dtype, non_blocking=True)
        out = rt.forward(chunks, inputs)
        if not rt.is_last:
            return StepOutput(out, None)
        params = [SamplingParams(s.temperature, s.top_k, s.top_p, s.seed, s.logprobs, s.logit_bias)
                  for s in step.sampling]
        positions = [c.start + c.length for c in chunks]
        penalized = [k for k, s in enumerate(step.sampling) if s.penalized]
        if self.outputs is not None and len(penalized) < len(chunks):  # slots now without penalties let go
            for c, s in zip((logical or step).chunks, step.sampling):
                if not s.penalized:
                    self.outputs.drop(c.slot)
        tokens = sample(self._penalized(logical or step, penalized, out) if penalized else out, params, positions)
        self.samples[step.mb] = (step.epoch, step.step, tokens)
        if all(p.logprobs is None for p in params):
            if not defer:
                return StepOutput(None, tokens.tolist())
            if tokens.is_cuda:
                host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                host.copy_(tokens, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                return StepOutput(None, None, pending=Pending(host, event))
            return StepOutput(None, None, pending=Pending(tokens, None))
        lps = [None if lp is None else TokenLogprob(*lp)
               for lp in token_logprobs(out, tokens, [p.logprobs for p in params])]
        return StepOutput(None, tokens.tolist(), logprobs=lps)

    def _penalized(self, step: StepRequest, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The logits of penalized chunks `rows` with their penalties applied (a copy), each slot's generated tokens
        brought up to its chunk first (stages/penalties.py; StepVoid where they are not known here). `step`: as the
        controller sent it (logical slots)."""
        if self.outputs is None:
            self.outputs = OutputCounts(logits.shape[1], logits.device)
        starts, offset = [], 0
        for c in step.chunks:
            starts.append(offset)
            offset += c.length
        chunks = [step.chunks[k] for k in rows]
        counts = self.outputs.update([c.slot for c in chunks], chunks, [step.sampling[k] for k in rows],
                                     [step.token_ids[starts[k] : starts[k] + step.chunks[k].length] for k in rows])
        return penalize(logits, rows, counts, [step.sampling[k].presence_penalty for k in rows],
                        [step.sampling[k].frequency_penalty for k in rows])

    def replays(self, step: StepRequest) -> bool:
        """The step replays a decode graph captured already: its launch is quick (no capture, no cuDNN engine to
        compile, no eager kernel launches)."""
        graphs = self.runtime.graphs
        if graphs is None:
            return False
        key = graphs.key([SeqChunk(c.slot, c.start, c.length) for c in step.chunks])
        return key is not None and key in graphs.graphs

    def _fed(self, step: StepRequest, chunks: list[SeqChunk]) -> tuple[list[int], list[int], torch.Tensor]:
        """A lookahead step's fed-back rows: (its token rows, their rows in the previous step, that step's tokens)."""
        fed = step.fed or []
        if len(fed) != len(chunks):
            raise InvalidRequestError(f"{len(chunks)} chunks but {len(fed)} fed entries")
        got = self.samples.get(step.mb)
        if got is None or got[0] != step.epoch or got[1] != step.step - 1 or not self.runtime.is_last:
            raise StepVoid(f"mb {step.mb} step {step.step} feeds back step {step.step - 1}'s tokens, which this stage "
                           "did not sample")
        sampled = got[2]
        rows, source, row = [], [], 0
        for c, j in zip(chunks, fed):
            if j >= 0:
                if c.length != 1 or j >= sampled.shape[0]:
                    raise InvalidRequestError(f"chunk of slot {c.slot}: fed row {j} of {sampled.shape[0]} for "
                                              f"{c.length} tokens")
                rows.append(row)
                source.append(j)
            row += c.length
        return rows, source, sampled
