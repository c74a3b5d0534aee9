"""`dejavu-generate`: offline generation through N chained shards; one JSON line per prompt, in input order."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stages.errors import StageError


class _Ordered(argparse.Action):
    """--prompt-ids and --prompt append to one list so the output keeps their command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        items = list(getattr(namespace, "prompts", None) or [])
        items.append((self.dest, values))
        namespace.prompts = items


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def resolve_model(model: str, cache_dir: str | None = None) -> Path:
    """`default` -> the embedded model (written on first use), else a directory path."""
    if model == "default":
        from stages.default_model import default_model_dir

        cache = cache_dir or os.environ.get("DEJAVU_CACHE") or str(Path.home() / ".cache" / "dejavu")
        return default_model_dir(Path(cache))
    return Path(model)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-generate", description=__doc__)
    p.add_argument("--model", default="default", help="Hugging Face model directory, or 'default'")
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=0, help="KV slot length (default: longest prompt + new)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-token-ids", type=_ids, default=[])
    p.add_argument("--prompt-ids", type=_ids, action=_Ordered, dest="ids", help="comma-separated ids (repeatable)")
    p.add_argument("--prompt", action=_Ordered, dest="text", help="text prompt (repeatable; needs a tokenizer)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    prompts = getattr(args, "prompts", None) or []
    if not prompts:
        parser().error("give at least one --prompt-ids or --prompt")
    from bus.text import load_tokenizer
    from stages.generate import GenerationRequest, LocalPipeline, generate
    from stages.layers.sampling import SamplingParams

    try:
        model_dir = resolve_model(args.model)
        tokenizer = load_tokenizer(model_dir)
        ids: list[list[int]] = []
        for kind, value in prompts:
            if kind == "text":
                if tokenizer is None:
                    raise StageError(f"{model_dir} has no tokenizer: use --prompt-ids")
                ids.append(list(tokenizer.encode(value)))
            else:
                ids.append(value)
        max_seq = args.max_seq_len or max(len(x) for x in ids) + args.max_new_tokens + 1
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        pipe = LocalPipeline(model_dir, args.stages, num_slots=len(ids), max_seq_len=max_seq, dtype=args.dtype,
                             device=args.device)
        reqs = [GenerationRequest(x, args.max_new_tokens, sampling, tuple(args.stop_token_ids)) for x in ids]
        results = generate(pipe, reqs)
    except (StageError, ValueError) as e:
        print(f"dejavu-generate: error: {e}", file=sys.stderr)
        return 2
    for r in results:
        line: dict[str, object] = {"prompt_ids": r.prompt_ids, "token_ids": r.token_ids,
                                   "finish_reason": r.finish_reason}
        if tokenizer is not None:
            line["text"] = tokenizer.decode(r.token_ids, skip_special_tokens=True)
        print(json.dumps(line), flush=True)
    return 0
