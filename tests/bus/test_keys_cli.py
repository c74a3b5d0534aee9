"""`dejavu-keys`: the four keypairs in the format bus/security.py loads, private modes, no silent overwrite; and
the ZAP domains: a client key opens the client socket only, a member key never does."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from bus import security
from bus.keys_cli import main


def test_generate_writes_loadable_private_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "keys"
    assert main(["generate", str(d)]) == 0
    out = capsys.readouterr().out
    assert "server.key_secret agent.key_secret public.json" in out and "admin.key_secret" in out
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in security.USER_KEYS:
        assert stat.S_IMODE((d / f"{name}.key_secret").stat().st_mode) == 0o600
        ring = security.load(d, name)
        assert ring.own_public and len(ring.secret) == 40
    assert set(security.load(d, "agent").public) == set(security.USER_KEYS)
    assert security.load_client_side(d).name == "server"

    before = (d / "public.json").read_text()
    assert main(["generate", str(d)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (d / "public.json").read_text() == before  # untouched
    assert main(["generate", str(d), "--force"]) == 0
    assert (d / "public.json").read_text() != before

    capsys.readouterr()
    assert main(["show", str(d)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in shown] == list(security.USER_KEYS)
    assert main(["show", str(tmp_path / "none")]) == 2


def test_client_keys_and_member_keys_stay_in_their_domains(tmp_path: Path) -> None:
    """One authenticator serves both domains; each socket admits its own domain's keys only, under their names."""
    users, members = tmp_path / "users", tmp_path / "members"
    assert main(["generate", str(users)]) == 0
    security.generate(members, ["controller", "stage-0"])
    ctl, clients = security.load(members, "controller"), security.load_client_side(users)

    async def scenario() -> dict[tuple[str, str], str | None]:
        ctx = zmq.asyncio.Context()
        auth = security.start_authenticator(ctx, ctl, clients)
        servers = {}
        for what, ring, domain in (("internal", ctl, security.ZAP_DOMAIN), ("client", clients,
                                                                                security.CLIENT_DOMAIN)):
            s = ctx.socket(zmq.ROUTER)
            s.linger = 0
            security.as_server(s, ring, domain)
            servers[what] = (s, s.bind_to_random_port("tcp://127.0.0.1"), ring.own_public)
        got: dict[tuple[str, str], str | None] = {}
        try:
            for who, ring in (("client", security.load(users, "client")), ("admin", security.load(users, "admin")),
                              ("stage-0", security.load(members, "stage-0"))):
                for what, (srv, port, server_key) in servers.items():
                    c = ctx.socket(zmq.DEALER)
                    c.linger = 0
                    # the server's public key as the connecting side knows it (a client knows `server` only)
                    c.curve_secretkey, c.curve_publickey = ring.secret, ring.own_public
                    c.curve_serverkey = server_key
                    mon = c.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
                    c.connect(f"tcp://127.0.0.1:{port}")
                    event = parse_monitor_message(await asyncio.wait_for(mon.recv_multipart(), 10))["event"]
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        await c.send(b"hi")
                        frames = await asyncio.wait_for(srv.recv_multipart(copy=False), 10)
                        got[(who, what)] = security.peer_of_frame(frames[1])
                    else:
                        got[(who, what)] = None
                    c.disable_monitor()
                    mon.close(0)
                    c.close(0)
        finally:
            if auth is not None:
                auth.stop()
            ctx.destroy(0)
        return got

    got = asyncio.run(scenario())
    assert got == {("client", "internal"): None, ("client", "client"): "client",
                   ("admin", "internal"): None, ("admin", "client"): "admin",
                   ("stage-0", "internal"): "stage-0", ("stage-0", "client"): None}


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("*", False), ("10.0.0.1", False), ("::", False),
    ("example.org", False), ("", False),
])
def test_loopback_host(host: str, loopback: bool) -> None:
    assert security.loopback_host(host) is loopback


def test_a_frame_from_the_loopback_says_so() -> None:
    ctx = zmq.Context()
    try:
        r, d = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        r.linger = d.linger = 0
        port = r.bind_to_random_port("tcp://127.0.0.1")
        d.connect(f"tcp://127.0.0.1:{port}")
        d.send(b"x")
        assert r.poll(10_000)
        frames = r.recv_multipart(copy=False)
        assert security.from_loopback(frames[1])
        assert security.peer_of_frame(frames[1]) is None  # plaintext: no User-Id
        assert not security.from_loopback(b"bytes have no properties")
    finally:
        ctx.destroy(0)
