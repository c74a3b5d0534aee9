"""bus/handshake.py: which failed handshakes are a client's final refusal, and what it is told."""

from __future__ import annotations

import zmq

from bus.handshake import DROPPED_IN_A_ROW, Handshakes

AUTH, PROTOCOL, DROPPED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                           zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


def test_refusals_in_words_are_final_at_once() -> None:
    assert "refused the 'client' key of K" in (Handshakes("tcp://x:1", "the 'client' key of K", True).final(AUTH, 400)
                                               or "")
    assert "requires CurveZMQ keys" in (Handshakes("tcp://x:1", "no keys", False).final(PROTOCOL, MISMATCH) or "")
    assert "serves plaintext clients" in (Handshakes("tcp://x:1", "k", True).final(PROTOCOL, MISMATCH) or "")


def test_dropped_handshakes_are_final_only_in_a_row_before_any_connection() -> None:
    for keyed, says in ((True, "server key is not the one"), (False, "requires CurveZMQ keys")):
        h = Handshakes("tcp://x:1", "k", keyed)
        assert [h.final(DROPPED, 32) for _ in range(DROPPED_IN_A_ROW - 1)] == [None] * (DROPPED_IN_A_ROW - 1)
        assert says in (h.final(DROPPED, 32) or "")
    h = Handshakes("tcp://x:1", "k", True)
    h.final(DROPPED, 32)
    h.succeeded()  # connected: the keys are right, and nothing is final any more
    assert all(h.final(e, v) is None for e, v in [(DROPPED, 32)] * 5 + [(AUTH, 400), (PROTOCOL, MISMATCH)])
    assert "refused" in h.why(AUTH, 400)
