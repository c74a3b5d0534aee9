"""`dejavu-client`: send one prompt to a running deployment and print the answer as it streams in.

Runs in its own short-lived process (a client of the controller, through bus.client.AsyncClient). Prints text
pieces when the model has a tokenizer, else token ids, then one line with the finish reason. Exit codes: 0 done,
2 a typed error (bad request, server failure, timeout, cancelled) with its message on stderr, 130 on Ctrl-C.
It never waits without a deadline (--connect-timeout, --timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TextIO

from bus.client import AsyncClient
from bus.errors import DejaVuError


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejavu-client", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the controller's client address, tcp://host:port "
                   "(dejavu-serve prints it on its 'ready' line)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="text prompt (the model needs a tokenizer)")
    g.add_argument("--prompt-ids", type=_ids, help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-token-ids", type=_ids, default=[], help="comma-separated, besides the model's EOS")
    p.add_argument("--status", action="store_true",
                   help="print the deployment's status as JSON (alone: only that; with a prompt: first)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole request")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds for the controller to answer")
    p.add_argument("--keys", metavar="DIR", help="a deployment started with --keys: the directory holding this "
                   "client's key and public.json (from dejavu-keys generate)")
    p.add_argument("--key-name", default="client", help="which key of --keys: client, or admin (its status also "
                   "shows pids, addresses and the model path)")
    p.add_argument("-v", "--verbose", action="store_true", help="client debug logs on stderr")
    return p


async def run(args: argparse.Namespace, out: TextIO) -> int:
    async with AsyncClient(args.address, timeout=args.timeout, connect_timeout=args.connect_timeout, keys=args.keys,
                           key_name=args.key_name) as client:
        if args.status:
            out.write(json.dumps(client.server_info or await client.status(), indent=2) + "\n")
            out.flush()
        if args.prompt is None and args.prompt_ids is None:
            return 0
        stream = client.stream(args.prompt, args.prompt_ids, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               stop_token_ids=args.stop_token_ids)
        async with stream:
            async for ev in stream:
                if ev.text is not None:
                    out.write(ev.text)
                elif ev.token_ids:
                    out.write((" " if ev.index else "") + " ".join(str(t) for t in ev.token_ids))
                out.flush()
        r = stream.result
        ttft = f"{r.ttft_s:.3f}s" if r.ttft_s is not None else "-"
        out.write(f"\n[finish_reason={r.finish_reason} prompt_tokens={r.num_prompt_tokens} "
                  f"generated={r.num_generated} ttft={ttft} latency={r.latency_s:.3f}s]\n")
        out.flush()
    return 0


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run `coro` on uvloop where it exists (one loop per process), else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.status and args.prompt is None and args.prompt_ids is None:
        p.error("give --prompt or --prompt-ids (or --status)")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return run_loop(run(args, sys.stdout))
    except DejaVuError as e:
        sys.stdout.flush()
        print(f"\ndejavu-client: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a malformed --address or timeout, keys that cannot be read
        print(f"dejavu-client: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndejavu-client: interrupted (the request was cancelled)", file=sys.stderr)
        return 130
