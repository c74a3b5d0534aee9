"""The OpenAI API of a real deployment (`dejavu-serve --http-port`), through the official `openai` client: completions
and chat, whole and streamed, equal to what the ZeroMQ client gets; stop strings; reproducible seeds; logprobs equal
to Hugging Face's, whole and streamed, and none unless asked; every error
status (400, 404, 413, 429, 503, 504) provoked; a client that disconnects cancels its request; /metrics counters
against the requests sent; a front of its own (no template: 400; its deadline; its drain cut short); and, last, a
drain under load that loses nothing while dejavu-serve stops.

One deployment for the module (1 stage, 4 slots, --max-queue 2: at most 6 requests in flight)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from bus.child import encode_config
from bus.client import AsyncClient
from bus.front.config import FrontConfig
from bus.text import load_tokenizer
from tests.conftest import start_deployment
from tests.tiny_models import load_hf

ROOT = Path(__file__).resolve().parents[3]
NAME = "chat-model"  # the model directory's name is the model's id in the API
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SLOTS, MAX_QUEUE, MAX_SEQ = 4, 2, 256
PROMPT = "The pipeline streams its KV cache"
LONG = 200  # output tokens of a request meant to outlast what the test does meanwhile (the prompt has 34)
GREEDY = {"temperature": 0}
IGNORE_EOS = {"extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def chat_model(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with a chat template in its tokenizer config."""
    path = tmp_path_factory.mktemp("chat") / NAME
    shutil.copytree(default_model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def dep(chat_model: Path):  # type: ignore[no-untyped-def]
    d = start_deployment(chat_model, 1, "--http-port", "0", "--microbatch-size", str(SLOTS), "--max-seq-len",
                         str(MAX_SEQ), "--max-queue", str(MAX_QUEUE))
    assert d.http.startswith("http://127.0.0.1:")
    yield d
    if d.proc.poll() is None:
        assert d.stop() == 0


def api(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)


async def collect(stream: Any) -> tuple[str, str | None, Any]:
    """Text, finish reason and usage of a streamed answer (completions or chat)."""
    text, finish, use = [], None, None
    async for chunk in stream:
        use = chunk.usage or use
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            text.append(piece or "")
            finish = c.finish_reason or finish
    return "".join(text), finish, use


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        await asyncio.sleep(0.01)  # polling a condition, with a deadline


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as r:
        return await r.json()


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with session.get(f"{base}/metrics") as r:
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_completions_whole_and_streamed_equal_the_zeromq_client(dep) -> None:  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c:
            models = await c.models.list()
            whole = await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, **GREEDY, **IGNORE_EOS)
            streamed = await collect(await c.completions.create(
                model=NAME, prompt=PROMPT, max_tokens=24, stream=True, stream_options={"include_usage": True},
                **GREEDY, **IGNORE_EOS))
        async with AsyncClient(dep.address) as z:
            ref = await z.generate(prompt=PROMPT, max_new_tokens=24, ignore_eos=True)
        return models, whole, streamed, ref

    models, whole, (text, finish, use), ref = asyncio.run(main())
    assert [m.id for m in models.data] == [NAME]
    assert whole.choices[0].text == text == ref.text and len(text) == 24  # one byte-level token per character
    assert whole.choices[0].finish_reason == finish == "length"
    assert whole.usage.prompt_tokens == use.prompt_tokens == ref.num_prompt_tokens
    assert whole.usage.completion_tokens == use.completion_tokens == 24


def test_chat_whole_and_streamed_follow_the_models_template(dep, chat_model) -> None:  # type: ignore[no-untyped-def]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is KV streaming?"}]
    tok = load_tokenizer(chat_model)
    ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)

    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c:
            whole = await c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, **GREEDY,
                                                    **IGNORE_EOS)
            streamed = await collect(await c.chat.completions.create(
                model=NAME, messages=messages, max_tokens=20, stream=True, **GREEDY, **IGNORE_EOS))
            ref = await c.completions.create(model=NAME, prompt=ids, max_tokens=20, **GREEDY, **IGNORE_EOS)
        return whole, streamed, ref

    whole, (text, finish, _), ref = asyncio.run(main())
    msg = whole.choices[0].message
    assert msg.role == "assistant" and msg.content == text == ref.choices[0].text
    assert whole.usage.prompt_tokens == len(ids) and finish == "length"


def test_stop_strings_cut_exactly_whole_and_streamed(dep) -> None:  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c:
            full = (await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, **GREEDY,
                                               **IGNORE_EOS)).choices[0].text
            stop = full[12:15]
            args = {"model": NAME, "prompt": PROMPT, "max_tokens": 40, "stop": ["never-in-this-text", stop]}
            whole = await c.completions.create(**args, **GREEDY, **IGNORE_EOS)
            streamed = await collect(await c.completions.create(**args, stream=True, **GREEDY, **IGNORE_EOS))
        return full, stop, whole, streamed

    full, stop, whole, (text, finish, _) = asyncio.run(main())
    cut = full[:full.index(stop)]
    assert whole.choices[0].text == text == cut  # up to, not including, the first occurrence
    assert whole.choices[0].finish_reason == finish == "stop"
    assert whole.usage.completion_tokens < 40


def test_seeds_are_reproducible(dep) -> None:  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c:
            def ask(seed: int, **kw: Any):  # type: ignore[no-untyped-def]
                return c.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=seed,
                                            **IGNORE_EOS, **kw)
            a, b, other = await asyncio.gather(ask(7), ask(7), ask(8))
            streamed = await collect(await ask(7, stream=True))
        return a.choices[0].text, b.choices[0].text, other.choices[0].text, streamed[0]

    a, b, other, streamed = asyncio.run(main())
    assert a == b == streamed != other


def test_logprobs_whole_and_streamed_equal_hugging_face(dep, chat_model) -> None:  # type: ignore[no-untyped-def]
    """completions `logprobs: 2` and chat `logprobs: true, top_logprobs: 2`, whole and streamed (each SSE chunk carries
    its tokens'), parsed by the openai client: log_softmax of HF's logits for the same greedy sequence, the top 2
    too; tokens spell the text; a request that asks for none gets none."""
    messages = [{"role": "user", "content": "What is KV streaming?"}]
    tok = load_tokenizer(chat_model)
    ids = list(tok.encode(PROMPT))
    chat_ids = tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    n = 12

    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c:
            comp = {"model": NAME, "prompt": PROMPT, "max_tokens": n, **GREEDY, **IGNORE_EOS}
            chat = {"model": NAME, "messages": messages, "max_tokens": n, **GREEDY, **IGNORE_EOS}
            whole = await c.completions.create(**comp, logprobs=2)
            streamed = [ch async for ch in await c.completions.create(**comp, logprobs=2, stream=True)]
            chat_whole = await c.chat.completions.create(**chat, logprobs=True, top_logprobs=2)
            chat_streamed = [ch async for ch in await c.chat.completions.create(**chat, logprobs=True, top_logprobs=2,
                                                                                stream=True)]
            plain = [await c.completions.create(**comp), await c.chat.completions.create(**chat)]
            plain += [ch async for ch in await c.completions.create(**comp, stream=True)]
            plain += [ch async for ch in await c.chat.completions.create(**chat, stream=True)]
        return whole, streamed, chat_whole, chat_streamed, plain

    whole, streamed, chat_whole, chat_streamed, plain = asyncio.run(main())
    hf = load_hf(chat_model)

    def reference(prompt: list[int], text: str) -> list[list[float]]:  # one byte-level token per character
        out = tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:]
        logp = torch.log_softmax(logits.float(), dim=-1)
        assert logp.argmax(-1).tolist() == out and len(out) == n
        return [[logp[i, t].item() for t in out[i:i + 1] + logp[i].topk(2).indices.tolist()] for i in range(n)]

    lp, text = whole.choices[0].logprobs, whole.choices[0].text
    ref = reference(ids, text)
    assert "".join(lp.tokens) == text and lp.text_offset == list(range(n))
    assert lp.token_logprobs == pytest.approx([r[0] for r in ref], abs=1e-4)
    assert [list(d.values()) for d in lp.top_logprobs] == [pytest.approx(r[1:], abs=1e-4) for r in ref]
    assert [next(iter(d)) for d in lp.top_logprobs] == lp.tokens  # greedy: the likeliest alternative is the token
    parts = [ch.choices[0].logprobs for ch in streamed if ch.choices and ch.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == lp.tokens and sum((p.text_offset for p in parts), []) == lp.text_offset
    assert sum((p.token_logprobs for p in parts), []) == pytest.approx(lp.token_logprobs, abs=1e-6)

    content = chat_whole.choices[0].logprobs.content
    ref = reference(chat_ids, chat_whole.choices[0].message.content)
    assert "".join(c.token for c in content) == chat_whole.choices[0].message.content
    assert bytes(sum((c.bytes for c in content), [])).decode() == chat_whole.choices[0].message.content
    assert [c.logprob for c in content] == pytest.approx([r[0] for r in ref], abs=1e-4)
    assert [[t.logprob for t in c.top_logprobs] for c in content] == [pytest.approx(r[1:], abs=1e-4) for r in ref]
    streamed_content = sum((ch.choices[0].logprobs.content for ch in chat_streamed
                            if ch.choices and ch.choices[0].logprobs), [])
    assert [(c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in streamed_content] == [
        (c.token, c.bytes, [t.token for t in c.top_logprobs]) for c in content]
    assert all(ch.choices[0].logprobs is None for ch in plain if ch.choices)


def test_n_choices_each_sample_with_their_own_seed_whole_and_streamed(dep) -> None:  # type: ignore[no-untyped-def]
    """n = 3 with seed s: choice i is the single-choice answer with seed s + i, whole and streamed (chunks of every
    index interleaved, each with its finish and logprobs), chat too; usage counts the prompt once and every
    choice's tokens; more choices than the front has room for is a 429."""
    sampled = {"temperature": 1.0, "max_tokens": 12, **IGNORE_EOS}

    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c:
            answers = [await c.completions.create(model=NAME, prompt=PROMPT, seed=7 + i, **sampled) for i in range(3)]
            singles = [a.choices[0].text for a in answers]
            whole = await c.completions.create(model=NAME, prompt=PROMPT, seed=7, n=3, logprobs=1, **sampled)
            stream = await c.completions.create(model=NAME, prompt=PROMPT, seed=7, n=3, logprobs=1, stream=True,
                                                stream_options={"include_usage": True}, **sampled)
            texts, finishes, tokens, use = ["", "", ""], [None] * 3, [0, 0, 0], None
            async for chunk in stream:
                use = chunk.usage or use
                for ch in chunk.choices:
                    texts[ch.index] += ch.text
                    finishes[ch.index] = ch.finish_reason or finishes[ch.index]
                    tokens[ch.index] += len(ch.logprobs.tokens) if ch.logprobs else 0
            chat = await c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}], seed=7,
                                                   n=2, **sampled)
            chat_single = await c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}],
                                                          seed=8, **sampled)
            with pytest.raises(openai.RateLimitError) as no_room:
                await c.completions.create(model=NAME, prompt=PROMPT, n=SLOTS + MAX_QUEUE + 1, **sampled)
        return answers, singles, whole, (texts, finishes, tokens, use), chat, chat_single, no_room.value

    answers, singles, whole, (texts, finishes, tokens, use), chat, chat_single, no_room = asyncio.run(main())
    assert [ch.index for ch in whole.choices] == [0, 1, 2]
    assert [ch.text for ch in whole.choices] == singles == texts and len(set(singles)) > 1
    assert [len(ch.logprobs.tokens) for ch in whole.choices] == tokens == [12, 12, 12]
    assert finishes == ["length"] * 3 and [ch.finish_reason for ch in whole.choices] == ["length"] * 3
    assert whole.usage.completion_tokens == use.completion_tokens == 36
    assert whole.usage.prompt_tokens == use.prompt_tokens == answers[0].usage.prompt_tokens  # the prompt once
    assert chat.choices[1].message.content == chat_single.choices[0].message.content
    assert chat.usage.completion_tokens == 24
    assert no_room.status_code == 429 and "(n)" in no_room.message


def test_logit_bias_is_honoured_as_the_zeromq_client_does_and_a_bad_one_is_400(dep, chat_model) -> None:  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with AsyncClient(dep.address) as z:
            plain = await z.generate(prompt=PROMPT, max_new_tokens=12, ignore_eos=True)
            bias = {plain.token_ids[0]: -100.0, plain.token_ids[1]: 3.0}
            ref = await z.generate(prompt=PROMPT, max_new_tokens=12, ignore_eos=True, logit_bias=bias)
        errors = []
        async with api(dep.http) as c:
            whole = await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, **GREEDY, **IGNORE_EOS,
                                               logit_bias={str(t): v for t, v in bias.items()})
            chat_ok = await c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}],
                                                      max_tokens=4, logit_bias={"70": 100}, **GREEDY, **IGNORE_EOS)
            for bad in ({"x": 1}, {"5": 101}, {"5": "1"}, [5], {"100000": 1}):
                with pytest.raises(openai.APIStatusError) as e:
                    await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, logit_bias=bad)
                errors.append(e.value)
        return plain, ref, whole, chat_ok, errors

    plain, ref, whole, chat_ok, errors = asyncio.run(main())
    assert whole.choices[0].text == ref.text != plain.text
    assert chat_ok.choices[0].message.content == load_tokenizer(chat_model).decode([70] * 4)  # +100: all but forced
    assert [e.status_code for e in errors] == [400] * 5
    assert [e.body["param"] for e in errors[:4]] == ["logit_bias"] * 4  # type: ignore[index]
    assert "outside" in errors[4].message  # the vocabulary: the deployment's check


def test_bad_requests_are_400_404_and_413(dep) -> None:  # type: ignore[no-untyped-def]
    async def main() -> list[openai.APIStatusError]:
        errors = []
        async with api(dep.http) as c:
            for kw in ({"temperature": 5}, {"logprobs": 21}, {"n": 17}, {"max_tokens": MAX_SEQ},
                       {"model": "gpt-4"}, {"prompt": "x" * (MAX_SEQ + 10)}):
                args = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, **kw}
                with pytest.raises(openai.APIStatusError) as e:
                    await c.completions.create(**args)
                errors.append(e.value)
            for kw in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": -1},
                       {"messages": [{"role": "user", "content": "x" * MAX_SEQ}]}):
                with pytest.raises(openai.APIStatusError) as e:
                    await c.chat.completions.create(**{"model": NAME, "messages": [{"role": "user", "content": "a"}],
                                                       **kw})
                errors.append(e.value)
        return errors

    errors = asyncio.run(main())
    assert [(e.status_code, e.body["param"]) for e in errors] == [  # type: ignore[index]
        (400, "temperature"), (400, "logprobs"), (400, "n"), (400, "max_tokens"), (404, "model"), (413, "prompt"),
        (400, "top_logprobs"), (400, "top_logprobs"), (413, "messages")]
    assert errors[3].code == errors[5].code == "context_length_exceeded"
    assert "logprobs must be an integer in [0, 21)" in errors[1].message
    assert "needs logprobs: true" in errors[6].message
    for e in errors:
        assert set(e.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


def test_a_full_queue_is_429_and_the_requests_in_it_all_finish(dep) -> None:  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c, aiohttp.ClientSession() as s:
            def one():  # type: ignore[no-untyped-def]
                return c.completions.create(model=NAME, prompt=PROMPT, max_tokens=60, stream=True, **GREEDY,
                                            **IGNORE_EOS)
            held = [asyncio.ensure_future(one()) for _ in range(SLOTS + MAX_QUEUE)]
            await until(lambda: _in_flight(s, dep.http, SLOTS + MAX_QUEUE), "6 requests in flight")
            with pytest.raises(openai.RateLimitError) as e:
                await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=4)
            outs = [await collect(await h) for h in held]
        return e.value, outs

    err, outs = asyncio.run(main())
    assert err.status_code == 429 and err.code == "queue_full" and "--max-queue" in err.message
    assert {(len(text), finish) for text, finish, _ in outs} == {(60, "length")}


async def _in_flight(s: aiohttp.ClientSession, base: str, n: int) -> bool:
    return (await get_json(s, f"{base}/health"))["in_flight"] == n


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_cancels_its_request(dep, n: int) -> None:  # type: ignore[no-untyped-def]
    """The same long request, once read to its end and once dropped after its first event: the dropped one leaves
    the deployment in a fraction of the time the whole one took (it was cancelled, not run to its end) - with n
    choices, every one of its n requests of the deployment."""
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": LONG, "stream": True, "temperature": 0, "ignore_eos": True,
            "n": n}

    async def main() -> tuple[float, float, float]:
        async with AsyncClient(dep.address) as z, aiohttp.ClientSession() as s:
            before = await scrape(s, dep.http)
            async with s.post(f"{dep.http}/v1/completions", json=body) as r:
                assert r.status == 200
                await r.content.readline()
                t0 = time.perf_counter()
                async for _ in r.content:
                    pass
                whole = time.perf_counter() - t0
            r = await s.post(f"{dep.http}/v1/completions", json=body)
            assert r.status == 200
            await r.content.readline()
            r.close()  # the connection goes away mid-stream
            t0 = time.perf_counter()
            await until(lambda: _idle(z), "the deployment idle after the disconnect")
            dropped = time.perf_counter() - t0
            await until(lambda: _in_flight(s, dep.http, 0), "the front idle")
            after = await scrape(s, dep.http)
        key = ("dejavu_requests_total", (("endpoint", "completions"), ("outcome", "cancelled")))
        return whole, dropped, after[key] - before[key]

    whole, dropped, cancelled = asyncio.run(main())
    print(f"{LONG} tokens read to the end in {whole:.2f}s; dropped after the first: gone in {dropped:.3f}s")
    assert cancelled == 1
    assert dropped < whole / 3, f"cancelled request left after {dropped:.2f}s; the whole one took {whole:.2f}s"


async def _idle(z: AsyncClient) -> bool:
    st = await z.status()
    return st["running"] == 0 and st["waiting"] == 0


def test_metrics_count_the_requests_sent(dep) -> None:  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c, aiohttp.ClientSession() as s:
            before = await scrape(s, dep.http)
            ok = [await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, **GREEDY),
                  await c.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=5, **GREEDY)]
            text, _, use = await collect(await c.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
                stream_options={"include_usage": True}, **GREEDY))
            for kw in ({"temperature": -1}, {"prompt": "x" * 1000}):
                with pytest.raises(openai.APIStatusError):
                    await c.completions.create(**{"model": NAME, "prompt": PROMPT, **kw})
            after = await scrape(s, dep.http)
        return before, after, [r.usage for r in ok] + [use]

    before, after, uses = asyncio.run(main())

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("dejavu_requests_total", endpoint="completions", outcome="success") == 2
    assert delta("dejavu_requests_total", endpoint="chat", outcome="success") == 1
    assert delta("dejavu_requests_total", endpoint="completions", outcome="bad_request") == 1
    assert delta("dejavu_requests_total", endpoint="completions", outcome="too_long") == 1
    assert sum(delta("dejavu_requests_total", endpoint=e, outcome=o) for e in ("completions", "chat")
               for o in ("overloaded", "unavailable", "timeout", "cancelled", "error")) == 0
    assert delta("dejavu_time_to_first_token_seconds_count", endpoint="completions") == 2
    assert delta("dejavu_time_per_output_token_seconds_count", endpoint="chat") == 1
    assert delta("dejavu_generation_tokens_total") == sum(u.completion_tokens for u in uses)
    assert delta("dejavu_prompt_tokens_total") == sum(u.prompt_tokens for u in uses)
    assert after[("dejavu_slots", ())] == SLOTS and after[("dejavu_status_up", ())] == 1
    assert after[("dejavu_deployment_state", (("state", "serving"),))] == 1
    stage = (("pipeline", "colocated"), ("stage", "0"))
    assert 0 <= after[("dejavu_stage_idle_fraction", stage)] <= 1 and after[("dejavu_stage_step_seconds", stage)] > 0
    for kind in ("prompt_to_token", "swap", "replica"):
        assert after[("dejavu_kv_streamed_bytes_total", (("kind", kind),))] == 0  # colocated, one host: none
    assert after[("dejavu_process_restarts_total", (("index", "0"), ("role", "front")))] == 0
    assert ("dejavu_queue_length", ()) in after and ("dejavu_running_requests", ()) in after


def start_front(cfg: FrontConfig, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str, Any]:
    """A front of its own (no supervisor), as `python -m bus.front.proc CONFIG`; its URL from its ready line."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "bus.front.proc", encode_config(cfg)], stdout=subprocess.PIPE,
                            stderr=log, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if sel.select(timeout=60):
        m = re.search(r"front: ready (https?://\S+)", proc.stdout.readline())
        if m:
            return proc, m.group(1), log
    proc.kill()
    log.seek(0)
    raise AssertionError(f"the front did not start: {log.read().decode()[-3000:]}")


def test_a_front_of_its_own_refuses_chat_without_a_template_times_out_and_cuts_its_drain(dep, default_model
                                                                                         ) -> None:  # type: ignore[no-untyped-def]
    """In front of the same controller, with the default model (no chat template), a 0.5 s request deadline and a
    0.2 s drain: chat is a 400 that says why; a long request is a 504; on SIGTERM new requests get 503 and the one
    in flight is cut with an error event when the drain's time is up; the process exits 0."""
    cfg = FrontConfig(controller=dep.address, model_dir=str(default_model), port=0, max_seq_len=MAX_SEQ,
                      request_timeout=0.5, drain_timeout=0.2, status_interval=0.2)
    proc, base, log = start_front(cfg)
    name = default_model.name

    async def main():  # type: ignore[no-untyped-def]
        async with api(base) as c, aiohttp.ClientSession() as s:
            with pytest.raises(openai.BadRequestError) as no_template:
                await c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.APIStatusError) as late:
                await c.completions.create(model=name, prompt=PROMPT, max_tokens=LONG, **IGNORE_EOS)
            stream = await c.completions.create(model=name, prompt=PROMPT, max_tokens=LONG, stream=True, **IGNORE_EOS)
            proc.send_signal(signal.SIGTERM)
            await until(lambda: _draining(s, base), "the front draining")
            with pytest.raises(openai.APIStatusError) as refused:
                await c.completions.create(model=name, prompt=PROMPT, max_tokens=4)
            with pytest.raises(openai.APIError) as cut:
                await collect(stream)
        return no_template.value, late.value, refused.value, cut.value

    try:
        no_template, late, refused, cut = asyncio.run(main())
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    print(f"cut in its drain: {cut.message}")
    assert no_template.code == "no_chat_template" and "no chat template" in no_template.message
    assert late.status_code == 504
    assert refused.status_code == 503 and refused.code == "draining"
    assert "drain_timeout" in cut.message or "not finished within" in cut.message


async def _draining(s: aiohttp.ClientSession, base: str) -> bool:
    return (await get_json(s, f"{base}/health"))["status"] == "draining"


def tls_certificate(tmp_path: Path) -> tuple[Path, Path, Any]:
    """A test CA's certificate for 127.0.0.1 (cert.pem, key.pem in tmp_path) and a client context trusting it."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(keyfile))
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    return certfile, keyfile, trust


def test_dejavu_serve_hands_its_front_the_api_keys_and_the_certificate(chat_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`dejavu-serve --api-key-file --tls-certfile --tls-keyfile`: the ready line's URL is https, and its front
    answers 401 without the key and 200 with it."""
    certfile, keyfile, trust = tls_certificate(tmp_path)
    (tmp_path / "keys").write_text("the-key\n")
    d = start_deployment(chat_model, 1, "--http-port", "0", "--max-seq-len", str(MAX_SEQ), "--api-key-file",
                         str(tmp_path / "keys"), "--tls-certfile", str(certfile), "--tls-keyfile", str(keyfile))

    async def main() -> list[int]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as s:
            out = []
            for headers in ({}, {"Authorization": "Bearer the-key"}):
                async with s.get(f"{d.http}/v1/models", headers=headers) as r:
                    out.append(r.status)
            return out

    try:
        assert d.http.startswith("https://127.0.0.1:")
        assert asyncio.run(main()) == [401, 200]
    finally:
        assert d.stop() == 0


def test_api_keys_over_tls_admit_only_their_holders_and_reload_on_sighup(dep, chat_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A front of its own over HTTPS (a test CA's certificate) with two keys from a file and one from
    $DEJAVU_API_KEY: each key's holder gets the same greedy completion as the keyless front; a wrong key and no key
    are 401 `invalid_api_key` (the openai client's AuthenticationError), counted as `unauthorized`; /health,
    /ready and /metrics answer without a key; after the file is rewritten and SIGHUP sent, the old key is refused
    and the new one accepted."""
    certfile, keyfile, trust = tls_certificate(tmp_path)
    keys = tmp_path / "api-keys"
    keys.write_text("# rotated monthly\nold-key\n\n  new-key  \n")
    cfg = FrontConfig(controller=dep.address, model_dir=str(chat_model), port=0, max_seq_len=MAX_SEQ,
                      status_interval=0.2, api_key_file=str(keys), tls_certfile=str(certfile),
                      tls_keyfile=str(keyfile))
    proc, base, log = start_front(cfg, {"DEJAVU_API_KEY": "env-key"})
    assert base.startswith("https://127.0.0.1:")

    def client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60,
                                  http_client=openai.DefaultAsyncHttpxClient(verify=trust))

    async def complete(c: openai.AsyncOpenAI) -> str:
        r = await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, **GREEDY)
        return r.choices[0].text

    async def refused(key: str) -> bool:
        async with client(key) as c:
            try:
                await complete(c)
            except openai.AuthenticationError:
                return True
        return False

    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c:
            expected = await complete(c)
        texts = []
        for key in ("old-key", "new-key", "env-key"):
            async with client(key) as c:
                texts.append(await complete(c))
        async with client("wrong-key") as c:
            with pytest.raises(openai.AuthenticationError) as wrong:
                await complete(c)
        https = aiohttp.TCPConnector(ssl=trust)
        async with aiohttp.ClientSession(connector=https) as s:
            async with s.post(f"{base}/v1/completions", json={"model": NAME, "prompt": PROMPT}) as r:
                none = (r.status, r.headers.get("WWW-Authenticate"), (await r.json())["error"]["code"])
            async with s.get(f"{base}/v1/models") as r:
                models = r.status
            opened = [(await s.get(f"{base}{path}")).status for path in ("/health", "/ready", "/metrics")]
            counted = (await scrape(s, base))[("dejavu_requests_total", (("endpoint", "completions"),
                                                                          ("outcome", "unauthorized")))]
        keys.write_text("newer-key\n")
        proc.send_signal(signal.SIGHUP)
        await until(lambda: refused("old-key"), "the old key refused after SIGHUP")
        async with client("newer-key") as c:
            texts.append(await complete(c))
        return expected, texts, wrong.value, none, models, opened, counted

    try:
        expected, texts, wrong, none, models, opened, counted = asyncio.run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert texts == [expected] * 4
    assert wrong.status_code == 401 and wrong.code == "invalid_api_key" and "not accepted" in wrong.message
    assert none == (401, "Bearer", "invalid_api_key") and models == 401
    assert opened == [200, 200, 200] and counted == 2


def test_the_http_benchmark_runs_both_paths_and_loses_nothing(dep, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`dejavu-bench serve --http` in small: as many clients as the front admits at once, both paths, a plot."""
    from bench import serve_bench

    out = tmp_path / "serve-http.json"
    assert serve_bench.main(["--http", f"{dep.http}/v1", "--clients", str(SLOTS + MAX_QUEUE), "--repeats", "1",
                             "--solo", "1", "--prompt-len", "4", "--output-len", "4", "--out", str(out),
                             "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert [(r["path"], r["completed"], r["lost"]) for r in report["rounds"]] == [("zmq", 6, 0), ("http", 6, 0)]
    assert report["address"] == dep.address and report["http_vs_zmq"]["latency_p50"]["ratio"] > 0
    assert report["rounds"][1]["cpu_ms_per_1k_tokens"]["front-0"] >= 0 and out.with_suffix(".png").is_file()


def test_a_killed_front_is_restarted_on_its_port(dep) -> None:  # type: ignore[no-untyped-def]
    """The front is supervised like the controller: killed, it comes back at the same address, and /metrics counts
    its restart."""
    async def main() -> None:
        async with AsyncClient(dep.address) as z:
            front = next(p for p in (await z.status())["processes"] if p["role"] == "front")
            os.kill(front["pid"], signal.SIGKILL)
        async with api(dep.http) as c, aiohttp.ClientSession() as s:
            await until(lambda: _restarts_counted(s, dep.http), "the front restarted and counted", 60)
            r = await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, **GREEDY)
            assert r.choices[0].finish_reason == "length"

    asyncio.run(main())


async def _restarts_counted(s: aiohttp.ClientSession, base: str) -> bool:
    try:
        metrics = await scrape(s, base)
    except aiohttp.ClientError:  # not listening yet
        return False
    return metrics.get(("dejavu_process_restarts_total", (("index", "0"), ("role", "front")))) == 1


def test_stopping_drains_the_front_first_and_loses_nothing(dep) -> None:  # type: ignore[no-untyped-def]
    """Last: SIGINT to dejavu-serve while 6 streams run (2 of them still queued). The front stops admitting (503)
    and every request in flight finishes whole - the controller and the stage stop only after - then exit 0."""
    async def main():  # type: ignore[no-untyped-def]
        async with api(dep.http) as c, aiohttp.ClientSession() as s:
            held = [asyncio.ensure_future(c.completions.create(
                model=NAME, prompt=PROMPT, max_tokens=80, stream=True, stream_options={"include_usage": True},
                **GREEDY, **IGNORE_EOS)) for _ in range(SLOTS + MAX_QUEUE)]
            await until(lambda: _in_flight(s, dep.http, SLOTS + MAX_QUEUE), "6 requests in flight")
            dep.proc.send_signal(signal.SIGINT)
            await until(lambda: _draining(s, dep.http), "the front draining")
            with pytest.raises(openai.APIStatusError) as refused:
                await c.completions.create(model=NAME, prompt=PROMPT, max_tokens=4)
            outs = [await collect(await h) for h in held]
        return refused.value, outs

    refused, outs = asyncio.run(main())
    assert refused.status_code == 503 and refused.code == "draining"
    assert [(len(text), finish, use.completion_tokens) for text, finish, use in outs] == [(80, "length", 80)] * 6
    assert dep.proc.wait(60) == 0
    logs = dep.logs()
    assert logs.index("[drain] every request finished") < logs.index("[shutdown] controller")
