"""What a failed ZeroMQ handshake means for a client of a deployment (bus/client.py), in words it can act on.

ZeroMQ never reports a refused handshake to the socket's user: it retries the connection forever and tells only
the socket monitor (EVENT_HANDSHAKE_FAILED_*). `Handshakes` reads those events in the client's process and
decides when they mean that this client's keys are wrong or missing - then every call fails with
AuthenticationError instead of waiting out its deadline. It must never turn a passing failure of a deployment
that accepted this client before (a controller restarting) into a permanent refusal.
"""

from __future__ import annotations

import zmq

FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
DROPPED_IN_A_ROW = 3  # handshakes the server drops without a word, in a row, before the client gives up


class Handshakes:
    """The outcome of a client's handshakes. Before the first connection a refusal in words (ZAP's 400, a security
    mechanism other than ours) is final at once; a handshake dropped without one - the server could not read ours
    (another server key), or the other side of a mechanism mismatch closed first - once it happened
    DROPPED_IN_A_ROW times in a row (a controller dying mid-handshake drops one too, then refuses connections until
    its successor binds). After a connection the keys were right: nothing is final (`final` returns None; `why`
    still says what happened)."""

    def __init__(self, address: str, whose: str, keyed: bool) -> None:
        self.address, self.whose, self.keyed = address, whose, keyed
        self.connected_once = False
        self.dropped = 0  # handshakes dropped without a word in a row

    def succeeded(self) -> None:
        self.connected_once, self.dropped = True, 0

    def final(self, event: int, value: int) -> str | None:
        """Why this client is refused for good, or None where it may still get through."""
        if self.connected_once:
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.dropped += 1
            if self.dropped < DROPPED_IN_A_ROW:
                return None
        return self.why(event, value)

    def why(self, event: int, value: int) -> str:
        """What a failed handshake means for the user (the socket monitor's event and value)."""
        address, whose = self.address, self.whose
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the deployment at {address} refused {whose} (ZAP status {value}): it admits only the client "
                    "and admin keys of its own `dejavu-keys` directory (setting: AsyncClient(keys=..., key_name=...))")
        # A security mechanism other than ours: ZeroMQ names it when this side reads the other's greeting first,
        # and reports a handshake dropped without detail when the other side closes first (a race).
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not self.keyed:
            event, value = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.keyed:
                return (f"the deployment at {address} serves plaintext clients and this client uses {whose}: leave "
                        "keys out (setting: AsyncClient(keys=...))")
            return (f"the deployment at {address} requires CurveZMQ keys and this client has none: "
                    "AsyncClient(address, keys=DIR) or dejavu-client --keys DIR, with the client (or admin) key "
                    "from the deployment's `dejavu-keys generate`")
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            return (f"the deployment at {address} dropped {DROPPED_IN_A_ROW} handshakes in a row from {whose}: its "
                    "server key is not the one in that directory's public.json (keys of another `dejavu-keys "
                    "generate`?), or it serves plaintext clients (then leave keys out)")
        return (f"the handshake with {address} failed (ZeroMQ protocol error {value:#x}): is a DéjàVu deployment "
                "there?")
