"""A deployment started with `--keys DIR` (dejavu-keys generate): clients holding DIR's client or admin key are
served exactly; a key of another directory, an unknown client key and a plaintext client are refused with
AuthenticationError at once (not when the connect deadline passes); status() shows pids, host names, addresses
and the model path to the admin key only; fuzz against the keyed client socket changes nothing. One deployment
serves the whole module."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from bus import security
from bus.client import AsyncClient
from bus.codec import Codec
from bus.errors import AuthenticationError
from bus.keys_cli import main as keys_main
from recovery.launch import ROOT, Deployment
from tests.bus.test_bad_input import _fuzz_frames, _fuzz_one
from tests.bus.test_serving import hf_greedy, workload
from tests.conftest import start_deployment

CLIENT_CLI = ROOT / "bin" / "dejavu-client"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "dejavu-keys"
    assert keys_main(["generate", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def dep(model_factory, keys: Path):  # type: ignore[no-untyped-def]
    d = start_deployment(model_factory("llama"), 2, "--keys", str(keys), "--microbatch-size", "4",
                         "--max-seq-len", "96")
    yield d
    assert d.stop() == 0


def test_keyed_clients_are_served_exactly(dep: Deployment, keys: Path, model_factory) -> None:  # type: ignore[no-untyped-def]
    path = model_factory("llama")
    from stages.models import load_spec

    work = workload(load_spec(path)[1].vocab_size)[:12]
    refs = hf_greedy(path, work)

    async def scenario() -> list[list[int]]:
        async with AsyncClient(dep.address, timeout=120, keys=keys) as c, \
                AsyncClient(dep.address, timeout=120, keys=keys, key_name="admin") as a:
            results = await asyncio.gather(*((c if i % 2 else a).generate(prompt_token_ids=p, max_new_tokens=n)
                                             for i, (p, n) in enumerate(work)))
        return [list(r.token_ids) for r in results]

    assert asyncio.run(scenario()) == refs


def _unknown_client_key(tmp_path: Path, keys: Path) -> Path:
    """A directory with a client key of its own and the deployment's true server key: past the encryption, the
    deployment's ZAP handler must say no."""
    d = tmp_path / "unknown"
    security.generate(d, ["client"])
    table = json.loads((d / "public.json").read_text())
    table["server"] = json.loads((keys / "public.json").read_text())["server"]
    (d / "public.json").write_text(json.dumps(table))
    return d


def test_wrong_keys_and_plaintext_are_refused_at_once(dep: Deployment, keys: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert keys_main(["generate", str(other)]) == 0
    cases = {  # what -> (AsyncClient keyword arguments, what the error says)
        "plaintext": ({}, "requires CurveZMQ keys and this client has none"),
        "another dejavu-keys directory": ({"keys": other}, "its server key is not the one"),
        "an unknown client key": ({"keys": _unknown_client_key(tmp_path, keys)}, "refused the 'client' key"),
        "the agent key": ({"keys": keys, "key_name": "agent"}, "refused the 'agent' key"),
    }

    async def attempt(kwargs: dict) -> tuple[str, float]:  # type: ignore[type-arg]
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError) as e:
            async with AsyncClient(dep.address, connect_timeout=30, **kwargs):
                pass
        return str(e.value), time.monotonic() - t0

    for what, (kwargs, says) in cases.items():
        message, took = asyncio.run(attempt(kwargs))
        assert says in message, (what, message)
        assert took < 10, (what, took)  # the refusal, not the 30 s deadline

    async def no_probe() -> None:  # without the probe, the first call hears it
        async with AsyncClient(dep.address, probe=False, timeout=30) as c:
            with pytest.raises(AuthenticationError):
                await c.generate(prompt_token_ids=[5, 6], max_new_tokens=2)
            with pytest.raises(AuthenticationError):
                c.stream(prompt_token_ids=[5], max_new_tokens=1)

    asyncio.run(no_probe())


def test_status_shows_where_things_run_to_the_admin_key_only(dep: Deployment, keys: Path,
                                                              model_factory) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> tuple[dict, dict]:  # type: ignore[type-arg]
        async with AsyncClient(dep.address, keys=keys) as c, \
                AsyncClient(dep.address, keys=keys, key_name="admin") as a:
            return await c.status(), await a.status()

    client, admin = asyncio.run(scenario())
    # the same processes, states and counts for both
    shape = [(p["role"], p["index"], p["incarnation"], p["state"]) for p in admin["processes"]]
    assert [(p["role"], p["index"], p["incarnation"], p["state"]) for p in client["processes"]] == shape
    assert {"controller", "stage", "supervisor"} <= {p["role"] for p in client["processes"]}
    for key in ("stages", "epoch", "slots", "state"):
        assert client[key] == admin[key], key
    assert [(h["host_id"], h["state"], h["stages"]) for h in client["hosts"]] == \
        [(h["host_id"], h["state"], h["stages"]) for h in admin["hosts"]]
    assert all(p["steps"] >= 0 and p["busy_s"] >= 0 for p in client["processes"] if p["role"] == "stage")
    # where things run: the admin key only
    assert client["model"] == "" and admin["model"] == str(model_factory("llama"))
    assert all(p["pid"] == 0 and p["host"] == "" and p["detail"] == "" for p in client["processes"])
    assert all(h["pid"] == 0 and h["address"] == "" and h["hostname"] == "" for h in client["hosts"])
    assert all(p["pid"] > 0 for p in admin["processes"] if p["role"] in ("controller", "stage", "supervisor"))
    assert any("tcp://" in p["detail"] or "ipc://" in p["detail"] for p in admin["processes"])
    assert any(p["host"] for p in admin["processes"])


def test_the_client_cli_takes_keys(dep: Deployment, keys: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(CLIENT_CLI), "--address", dep.address, *args],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    ok = cli("--keys", str(keys), "--key-name", "admin", "--status", "--prompt-ids", "5,6,7", "--max-new-tokens", "3")
    assert ok.returncode == 0 and "finish_reason=length" in ok.stdout, ok.stderr
    status = json.loads(ok.stdout[:ok.stdout.rindex("}") + 1])
    assert status["processes"][0]["pid"] > 0, ok.stdout
    plain = cli("--prompt-ids", "5,6,7", "--max-new-tokens", "3")
    assert plain.returncode == 2 and "AuthenticationError" in plain.stderr, plain.stderr
    missing = cli("--keys", str(keys), "--key-name", "nobody", "--status")  # no such key: before connecting
    assert missing.returncode == 2 and "'nobody'" in missing.stderr, missing.stderr


def test_fuzz_the_keyed_client_socket_then_serve_exactly(dep: Deployment, keys: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert keys_main(["generate", str(other)]) == 0

    async def scenario() -> None:
        async with AsyncClient(dep.address, timeout=60, keys=keys, key_name="admin") as a:
            before = await a.status()
            baseline = await a.generate(prompt_token_ids=[9, 8, 7], max_new_tokens=8)
            client = security.load(keys, "client")
            internal = [x for p in before["processes"] for x in p["detail"].split() if x.startswith("tcp://")]
            assert internal  # the agents' join socket at least: a CURVE server with the same `server` key
            ctx = zmq.asyncio.Context()
            rng = random.Random(4321)
            codec = Codec("fuzz")
            took: dict[str, list[int]] = {}
            try:
                for who, keyring in (("plaintext", None), ("another directory", security.load(other, "client")),
                                     ("unknown key", security.load(_unknown_client_key(tmp_path, keys), "client")),
                                     ("client", client)):
                    took[who] = [kind for kind in (zmq.DEALER, zmq.PUSH) if await _fuzz_one(
                        ctx, kind, dep.address, _fuzz_frames(rng, codec),
                        None if keyring is None else (keyring, "server"))]
                for address in internal:  # a client key opens no internal socket
                    took[address] = [kind for kind in (zmq.DEALER, zmq.PUSH) if await _fuzz_one(
                        ctx, kind, address, _fuzz_frames(rng, codec), (client, "server"))]
            finally:  # never left to the garbage collector: a context's term() there blocks a later test
                ctx.destroy(linger=0)
            # the client socket is a ROUTER: a DEALER with the client key gets every frame in; nothing else gets in
            assert took.pop("client") == [zmq.DEALER]
            assert not any(took.values()), took
            after = await a.status()
            again = await a.generate(prompt_token_ids=[9, 8, 7], max_new_tokens=8)
            assert again.token_ids == baseline.token_ids
            inc = {(p["role"], p["index"]): p["incarnation"] for p in before["processes"]}
            assert inc == {(p["role"], p["index"]): p["incarnation"] for p in after["processes"]}

    asyncio.run(scenario())
