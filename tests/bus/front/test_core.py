"""The front's pure parts, driven directly: stop strings against a reference, request parsing and its refusals,
admission (queue bound, drain, degraded), the error mapping, and /metrics rendered from a status."""

from __future__ import annotations

import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.errors import BadRequestError, RequestTimeoutError, ServerError
from bus.front.admission import Admission
from bus.front.errors import ApiError, from_client
from bus.front.logprobs import LogprobsWriter, TokenTexts
from bus.front.metrics import Metrics, restarts
from bus.front.protocol import MAX_N, parse_chat, parse_completion
from bus.front.stops import StopMatcher
from bus.messages import TokenLogprob
from bus.requests import MAX_LOGPROBS
from bus.text import load_tokenizer


def test_stop_strings_cut_before_the_first_and_never_leak_a_part_of_one() -> None:
    """Reference: after each piece, the text so far is cut before the earliest stop string it contains."""
    rng = random.Random(0)
    for _ in range(5000):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        pieces, pos = [], 0
        while pos < len(text):
            n = rng.randint(1, 5)
            pieces.append(text[pos:pos + n])
            pos += n
        expect, so_far, stops_ref = text, "", False
        for p in pieces:
            so_far += p
            found = [i for s in stops if (i := so_far.find(s)) >= 0]
            if found:
                expect, stops_ref = so_far[:min(found)], True
                break
        m, out, stopped = StopMatcher(stops), [], False
        for p in pieces:
            piece, stopped = m.push(p)
            out.append(piece)
            assert expect.startswith("".join(out)), "handed out text that belongs to a stop string"
            if stopped:
                break
        if not stopped:
            out.append(m.flush())
        assert ("".join(out), stopped) == (expect, stops_ref), (text, stops, pieces)


def test_parsing_defaults_extensions_and_refusals() -> None:
    p = parse_completion({"model": "m", "prompt": "hi"})
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.stream) == (None, 1.0, 1.0, None, (), False)
    p = parse_completion({"model": "m", "prompt": [5, 6], "stop": "x", "top_k": 3, "ignore_eos": True, "seed": 9,
                          "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4})
    assert (p.prompt, p.stop, p.top_k, p.ignore_eos, p.seed, p.include_usage, p.max_tokens) == (
        [5, 6], ("x",), 3, True, 9, True, 4)
    messages, p = parse_chat({"model": "m", "max_completion_tokens": 7,
                              "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]})
    assert messages == [{"role": "user", "content": "a"}] and p.max_tokens == 7
    refused = [
        ({"model": "m", "prompt": "hi", "logprobs": -1}, "logprobs"),
        ({"model": "m", "prompt": "hi", "logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"model": "m", "prompt": "hi", "logprobs": True}, "logprobs"),
        ({"model": "m", "prompt": "hi", "n": 0}, "n"),
        ({"model": "m", "prompt": "hi", "n": MAX_N + 1}, "n"),
        ({"model": "m", "prompt": "hi", "n": 2, "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "hi", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "hi", "seed": -1}, "seed"),
        ({"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "hi"}, "model"),
        ({"model": "m", "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
        ({"model": "m", "prompt": "hi", "frequency_penalty": "1"}, "frequency_penalty"),
        ({"model": "m", "prompt": "hi", "logit_bias": {"7": 100.5}}, "logit_bias"),
        ({"model": "m", "prompt": "hi", "echo": True}, "echo"),
    ]
    for body, param in refused:
        with pytest.raises(ApiError) as e:
            parse_completion(body)
        assert (e.value.status, e.value.param) == (400, param), body
    for extra, param in (({"logprobs": 2}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                         ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
                         ({"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs")):
        with pytest.raises(ApiError) as e:
            parse_chat({"model": "m", "messages": [{"role": "user", "content": "a"}], **extra})
        assert (e.value.status, e.value.param) == (400, param), extra


def test_logprobs_are_asked_per_endpoint() -> None:
    """completions: `logprobs: N`; chat: `logprobs: true` and `top_logprobs: N`; absent or false: None."""
    chat = {"model": "m", "messages": [{"role": "user", "content": "a"}]}
    assert parse_completion({"model": "m", "prompt": "hi"}).logprobs is None
    assert parse_completion({"model": "m", "prompt": "hi", "logprobs": 0}).logprobs == 0
    assert parse_completion({"model": "m", "prompt": "hi", "logprobs": MAX_LOGPROBS}).logprobs == MAX_LOGPROBS
    assert parse_chat(chat)[1].logprobs is None
    assert parse_chat({**chat, "logprobs": False})[1].logprobs is None
    assert parse_chat({**chat, "logprobs": True})[1].logprobs == 0
    assert parse_chat({**chat, "logprobs": True, "top_logprobs": 3})[1].logprobs == 3


def test_logprobs_writer_spells_tokens_as_the_openai_api(default_model) -> None:  # type: ignore[no-untyped-def]
    """The default model's byte-level tokens: exact bytes (also for a byte inside a UTF-8 character, whose text is
    U+FFFD), special tokens by name; offsets count the characters of the text before each token."""
    texts = TokenTexts(load_tokenizer(default_model))
    assert texts.byte_level
    assert texts.get(3 + ord(" ")) == (" ", [32]) and texts.get(3 + 0xE2) == ("\ufffd", [0xE2])
    assert texts.get(2) == ("</s>", list(b"</s>"))
    a, b = 3 + ord("a"), 3 + ord("b")
    events = [([a], [TokenLogprob(-0.5, [a, b], [-0.5, -1.5])], "a"), ([3 + 0xE2], [TokenLogprob(-2.0)], ""),
              ([3 + 0x82], [TokenLogprob(-3.0)], ""), ([3 + 0xAC], [TokenLogprob(-4.0)], "\u20ac"),
              ([b], [TokenLogprob(-1.0, [b], [-1.0])], "b")]
    comp, chat = LogprobsWriter(texts, chat=False), LogprobsWriter(texts, chat=True)
    for ids, lps, text in events:
        comp.add(ids, lps, text)
        chat.add(ids, lps, text)
    got = comp.take()
    assert got is not None and comp.take() is None
    assert got["tokens"] == ["a", "\ufffd", "\ufffd", "\ufffd", "b"]
    assert got["token_logprobs"] == [-0.5, -2.0, -3.0, -4.0, -1.0]
    assert got["top_logprobs"] == [{"a": -0.5, "b": -1.5}, {}, {}, {}, {"b": -1.0}]
    assert got["text_offset"] == [0, 1, 1, 1, 2]  # the euro sign's three bytes begin where it does
    content = chat.take()["content"]  # type: ignore[index]
    assert [c["bytes"] for c in content] == [[97], [0xE2], [0x82], [0xAC], [98]]
    assert bytes(sum((c["bytes"] for c in content), [])).decode() == "a\u20acb"
    assert content[0]["top_logprobs"] == [{"token": "a", "logprob": -0.5, "bytes": [97]},
                                          {"token": "b", "logprob": -1.5, "bytes": [98]}]


def test_admission_bounds_the_queue_and_refuses_while_draining_or_degraded() -> None:
    a = Admission(max_queue=2)
    a.update({"slots": 3, "state": "serving"})
    holds = [a.hold() for _ in range(5)]
    for h in holds:
        assert a.refusal() is None
        h.__enter__()
    refusal = a.refusal()
    assert refusal is not None and refusal.status == 429 and not a.idle.is_set()
    for h in holds:
        h.__exit__(None, None, None)
    assert a.idle.is_set() and a.refusal() is None and a.ready
    a.update({"slots": 3, "state": "degraded"})
    assert a.refusal().status == 503 and not a.ready  # type: ignore[union-attr]
    a.update({"slots": 3, "state": "serving"})
    a.update(None)  # an unanswered poll: not ready, but requests still go (the client reconnects and resumes)
    assert a.refusal() is None and not a.ready
    a.draining = "signal SIGTERM"
    assert a.refusal().status == 503 and a.refusal().code == "draining"  # type: ignore[union-attr]


def test_client_errors_map_to_openai_statuses() -> None:
    assert from_client(BadRequestError("request x: prompt of 300 tokens is too long ... [ERR_BAD_REQUEST]")).status == 413
    assert from_client(BadRequestError("temperature ... [ERR_BAD_REQUEST]")).status == 400
    assert from_client(ServerError("5 requests already waiting [ERR_OVERLOADED]")).status == 429
    assert from_client(ServerError("the deployment stopped [ERR_SERVER]")).status == 503
    assert from_client(RequestTimeoutError("not finished")).status == 504


def status(busy: float, steps: int, uptime: float, recoveries: list[dict[str, object]]) -> dict[str, object]:
    return {"state": "serving", "waiting": 3, "running": 4, "slots": 8, "kv_streamed_bytes": 2048, "receive_waits": 2,
            "processes": [{"role": "controller", "index": 0, "incarnation": 1},
                          {"role": "stage", "index": 0, "incarnation": (1 << 16) | 2, "busy_s": busy, "steps": steps,
                           "uptime_s": uptime, "pipeline": "token",
                           "swap": {"mode": "on", "on": True, "bytes_in": 300, "bytes_out": 200}}],
            "hosts": [{"state": "up"}, {"state": "spare"}],
            "replicas": [{"stage": 0, "bytes": 1000, "lag_steps": 1, "lag_tokens": 5}], "recoveries": recoveries}


def test_metrics_from_status() -> None:
    m = Metrics()
    rec = {"stage": 0, "epoch": 3, "detected_at": 1.0, "serving_at": 2.0, "source": "replica"}
    m.status.update(status(1.0, 100, 10.0, []))
    m.status.update(status(1.5, 150, 12.0, [rec]))
    m.status.update(status(1.5, 150, 13.0, [rec]))  # the same recovery again: counted once
    m.outcome("chat", "success")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert samples[("dejavu_requests_total", (("endpoint", "chat"), ("outcome", "success")))] == 1
    assert samples[("dejavu_queue_length", ())] == 3 and samples[("dejavu_running_requests", ())] == 4
    stage = (("pipeline", "token"), ("stage", "0"))
    assert samples[("dejavu_stage_step_seconds", stage)] == pytest.approx(0.01)  # 0.5 s / 50 steps
    assert samples[("dejavu_stage_idle_fraction", stage)] == 1.0  # nothing computed in the last second
    assert samples[("dejavu_kv_streamed_bytes_total", (("kind", "replica"),))] == 1000
    assert samples[("dejavu_kv_streamed_bytes_total", (("kind", "prompt_to_token"),))] == 2048
    assert samples[("dejavu_kv_streamed_bytes_total", (("kind", "swap"),))] == 500  # out and back in
    assert samples[("dejavu_receive_waits_total", ())] == 2
    assert samples[("dejavu_recoveries_total", (("source", "replica"),))] == 1
    assert samples[("dejavu_process_restarts_total", (("index", "0"), ("role", "stage")))] == 3
    assert samples[("dejavu_hosts", (("state", "spare"),))] == 1
    assert restarts("controller", 2) == 2 and restarts("stage", 1 << 16) == 1
    assert restarts("streamer", (2 << 16) | 1) == 3  # its host's third boot, restarted once there
    m.status.update(None)
    text = m.render().decode()
    assert "dejavu_status_up 0.0" in text and "dejavu_queue_length" not in text
