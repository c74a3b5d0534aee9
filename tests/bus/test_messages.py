"""Wire format: golden bytes pin the encoding; the codec rejects everything that is not a valid message."""

from __future__ import annotations

import msgspec
import pytest

from bus.codec import MAX_CONTROL_BYTES, Codec
from bus.errors import ProtocolError
from bus.messages import (
    ALL_MESSAGES,
    PROTOCOL_VERSION,
    Chunk,
    Envelope,
    GenerateRequest,
    Sampling,
    StepRequest,
    StepResult,
    TensorMeta,
    TokenChunk,
    TokenLogprob,
)


def test_tags_are_unique_and_stable() -> None:
    tags = [cls.__struct_config__.tag for cls in ALL_MESSAGES]
    assert len(tags) == len(set(tags))
    assert all(isinstance(t, int) for t in tags)


GOLDEN = [
    (GenerateRequest("r1", prompt_token_ids=[1, 2], max_new_tokens=4, seed=7),
     "dc001014a27231c092010204cb000000000000000000cb3ff00000000000000790c2c0c0c0cb0000000000000000cb0000000000000000"),
    # + resume_token_ids, logprobs, logit_bias (nil), presence_penalty, frequency_penalty (0.0)
    (TokenChunk("r1", 3, [42], "x"), "9616a2723103912aa178c0"),  # + logprobs (nil)
    (StepRequest(2, 1, 9, [Chunk(0, 0, 3)], [5, 6, 7], [Sampling()], TensorMeta("float32", [3, 8])),
     "9b28020109919300000393050607919acb000000000000000000cb3ff000000000000000c090cb0000000000000000cb000000000000000000c092a7666c6f61743332920308c0c0c0"),
    # + Sampling.logprobs (nil), logit_bias ([]), presence_penalty, frequency_penalty (0.0), output_start (0),
    # history (nil); + kv_to (nil): disaggregation's prompt passes name the token slots their KV goes
    # to; + joined (nil): the chunks whose request joined the token pipeline; + fed (nil): a lookahead step's rows
    # fed back from the previous step's samples
    (StepResult(2, 1, 9, [5, 6], [TokenLogprob(-0.5, [5, 7], [-0.5, -1.25]), None]),
     "96290201099205069293cbbfe000000000000092050792cbbfe0000000000000cbbff4000000000000c0"),
]


@pytest.mark.parametrize("msg,hexbytes", GOLDEN)
def test_golden_bytes(msg, hexbytes: str) -> None:  # type: ignore[no-untyped-def]
    assert msgspec.msgpack.encode(msg).hex() == hexbytes
    assert msgspec.msgpack.decode(bytes.fromhex(hexbytes), type=type(msg)) == msg


def test_step_request_round_trip() -> None:
    c = Codec("stage-0", 3)
    step = StepRequest(2, 1, 9, [Chunk(0, 0, 3)], [5, 6, 7], [Sampling(0.5, 4, 0.9, 11)], TensorMeta("bfloat16", [3, 8]))
    got = c.decode(c.encode(step, reply_to=5))
    assert got.body == step
    assert (got.env.sender, got.env.incarnation, got.env.reply_to, got.env.version) == ("stage-0", 3, 5, PROTOCOL_VERSION)


def test_message_ids_increase() -> None:
    c = Codec("x")
    ids = [c.decode(c.encode(TokenChunk("r", 0, []))).env.msg_id for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00",
        b"\xc1",  # never-used msgpack byte
        msgspec.msgpack.encode([1, 2, 3]),
        msgspec.msgpack.encode(Envelope(PROTOCOL_VERSION + 1, 1, "x", 0, 0, msgspec.Raw(b"\x90"))),  # version
        msgspec.msgpack.encode(Envelope(PROTOCOL_VERSION, 1, "x", 0, 0, msgspec.Raw(msgspec.msgpack.encode([999])))),
        msgspec.msgpack.encode(Envelope(PROTOCOL_VERSION, 1, "x", 0, 0,
                                        msgspec.Raw(msgspec.msgpack.encode([20, "r", None, "not-a-list"])))),
        msgspec.msgpack.encode(Envelope(PROTOCOL_VERSION, 1, "x", 0, 0, msgspec.Raw(b"\x92\x16"))),  # truncated
    ],
)
def test_decode_rejects(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        Codec("y").decode(frame)


def test_decode_rejects_oversized() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        Codec("y").decode(b"\x00" * (MAX_CONTROL_BYTES + 1))


def test_no_pickle_in_the_wire_path() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    for pkg in ("bus", "stages", "streamer", "recovery"):
        for path in (root / pkg).rglob("*.py"):
            text = path.read_text()
            for bad in ("import pickle", "recv_pyobj", "send_pyobj", "cloudpickle", "pickle.loads"):
                assert bad not in text, f"{path}: {bad}"


def test_old_decoders_accept_new_trailing_fields() -> None:
    """A field added at the end (with a default) must not break a peer that does not know it yet."""

    class OldGenerateRequest(msgspec.Struct, frozen=True, array_like=True, tag_field="t", tag=20):
        request_id: str
        prompt: str | None = None

    new = msgspec.msgpack.encode(GenerateRequest("r", prompt="hi", ignore_eos=True))
    assert msgspec.msgpack.decode(new, type=OldGenerateRequest) == OldGenerateRequest("r", "hi")
