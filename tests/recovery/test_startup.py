"""Start-up as a user meets it: a mistake is one line on stderr that says what to change, exit code 2, and nothing
left running or on disk; a deployment killed with -9 leaves nothing behind either; --log-dir gets one log per
process and the terminal stays quiet."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bus.child import alive
from bus.client import AsyncClient
from recovery.launch import ROOT, SERVE, descendants
from streamer.config import SHM_DIR, SHM_PREFIX
from tests.conftest import start_deployment


def serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SERVE), "--stage-threads", "1", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def leftovers(pid: int) -> list[str]:
    """What a deployment whose supervisor had `pid` left: run directories and shared-memory pools of its own and of
    any other process that is gone (its host agents: each has its own, named after its pid)."""
    def gone(owner: str) -> bool:
        return owner.isdigit() and (int(owner) == pid or not alive(int(owner)))

    runs = [p for p in Path("/tmp").glob("dejavu-*-*") if p.is_dir() and gone(p.name.split("-")[1])]
    pools = [p for p in SHM_DIR.glob(f"{SHM_PREFIX}-d*-*") if gone(p.name[len(SHM_PREFIX) + 2:].split("-", 1)[0])]
    return [str(p) for p in [*runs, *pools]]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dejavu-serve: error: "), err
    return lines[0]


@pytest.fixture
def busy_port():  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def test_usage_mistakes_are_one_line_and_exit_code_2(default_model, busy_port, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cases = {
        ("--model", str(tmp_path / "nowhere")): "no such directory",
        ("--model", str(default_model), "--stages", "9"): "the model has 8 layers; choose 1 to 8 stages",
        ("--model", str(default_model), "--port", str(busy_port)): f"--port {busy_port}: already in use",
        ("--model", str(default_model), "--microbatch-size", "0"): "--microbatch-size must be >= 1",
        ("--model", str(default_model), "--hosts", "0"): "--hosts 0: stages run only on agents of other machines",
        ("--model", str(default_model), "--agent-bind", "tcp://0.0.0.0:7700"): "agents of other machines join with",
        ("--model", str(default_model), "--device", "cuda", "--stages", "8"): "--device cuda",  # CPU torch, or < 8 GPUs
        # a plaintext client socket beyond the loopback; keys that are not there
        ("--model", str(default_model), "--host", "0.0.0.0"): "--host 0.0.0.0: a client socket beyond this "
                                                                "machine's loopback needs keys: give --keys DIR",
        ("--model", str(default_model), "--keys", str(tmp_path / "no-keys")): "--keys: ",
    }
    (tmp_path / "no-weights").mkdir()
    shutil.copy(default_model / "config.json", tmp_path / "no-weights")
    cases[("--model", str(tmp_path / "no-weights"))] = "no *.safetensors files"
    for args, says in cases.items():
        out = subprocess.Popen([sys.executable, str(SERVE), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT)
        stdout, stderr = out.communicate(timeout=60)
        assert out.returncode == 2, (args, stderr)
        assert says in one_line(stderr), (args, stderr)
        assert not stdout
        assert not leftovers(out.pid)


def test_a_checkpoint_a_stage_cannot_load_stops_the_start_at_once(default_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Found only when a stage reads its weights: the stage says why and exits 2; the supervisor does not restart
    it (it would fail the same way) and stops everything at once."""
    bad = tmp_path / "model"
    shutil.copytree(default_model, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:1000])
    proc = subprocess.Popen([sys.executable, str(SERVE), "--model", str(bad), "--stages", "2", "--stage-threads", "1",
                             "--max-restarts", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    line = one_line(stderr)
    assert "cannot load its layers" in line and "not a readable safetensors file" in line, line
    assert not leftovers(proc.pid)


def test_a_controller_that_cannot_bind_stops_the_start_with_one_line(default_model, busy_port) -> None:  # type: ignore[no-untyped-def]
    """The port is checked before start, but may be taken in between: the controller says so and exits 2
    (the supervisor is run here without the CLI's check)."""
    code = textwrap.dedent(f"""
        import sys
        from recovery.proc import DeploymentError, run_supervisor
        from recovery.specs import DeploymentConfig
        try:
            run_supervisor(DeploymentConfig({str(default_model)!r}, port={busy_port}, stage_threads=1))
        except DeploymentError as e:
            print(f"config={{e.config}} {{e}}", file=sys.stderr)
            sys.exit(2)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert f"config=True the controller cannot listen on tcp://127.0.0.1:{busy_port}" in out.stderr
    assert "--port" in out.stderr.splitlines()[-1]


def test_kill_9_of_serve_leaves_no_process_and_no_file(default_model) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import start_deployment

    dep = start_deployment(default_model, 2)
    pid = dep.proc.pid
    tree = descendants(pid)
    assert len(tree) >= 4 and leftovers(pid)  # controller, streamer, 2 stages (+ janitor); run dir + 2 pools
    dep.proc.send_signal(signal.SIGKILL)
    dep.proc.wait(10)
    deadline = time.monotonic() + 30
    while (any(alive(p) for p in tree) or leftovers(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)  # no event says "swept": poll, with a deadline
    assert not [p for p in tree if alive(p)]
    assert not leftovers(pid)


def test_log_dir_gets_a_log_per_process_and_stderr_stays_quiet(default_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    proc = subprocess.Popen([sys.executable, str(SERVE), "--model", str(default_model), "--stages", "2",
                             "--stage-threads", "1", "--log-dir", str(tmp_path / "logs"), "--log-level", "INFO"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready tcp://" in line
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert stderr == ""
    names = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert names == ["agent-0.log", "controller-0.log", "stage-0.log", "stage-1.log", "streamer-0.log",
                     "supervisor.log"]
    assert "[handshake]" in (tmp_path / "logs" / "stage-1.log").read_text()


def test_insecure_serves_plaintext_beyond_the_loopback_with_a_warning(default_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--host 0.0.0.0 --insecure starts (one warning line); a client on the loopback counts as an administrator
    (pids in status); a client with keys hears that this deployment serves plaintext."""
    from bus.errors import AuthenticationError
    from bus.keys_cli import main as keys_main

    assert keys_main(["generate", str(tmp_path / "keys")]) == 0
    dep = start_deployment(default_model, 1, "--host", "0.0.0.0", "--insecure")
    address = dep.address.replace("0.0.0.0", "127.0.0.1")

    async def scenario() -> dict:  # type: ignore[type-arg]
        with pytest.raises(AuthenticationError, match="serves plaintext clients"):
            async with AsyncClient(address, keys=tmp_path / "keys"):
                pass
        async with AsyncClient(address, timeout=30) as c:
            assert len((await c.generate(prompt_token_ids=[5, 6], max_new_tokens=3)).token_ids) == 3
            return await c.status()

    try:
        assert dep.address.startswith("tcp://0.0.0.0:")
        st = asyncio.run(scenario())
        assert all(p["pid"] > 0 for p in st["processes"] if p["role"] in ("controller", "stage")), st
        assert st["model"] == str(default_model)
        warnings = [line for line in dep.logs().splitlines() if line.startswith("dejavu-serve: warning: ")]
        assert len(warnings) == 1 and "--host 0.0.0.0 --insecure: the client socket is plaintext" in warnings[0]
    finally:
        assert dep.stop() == 0


def test_at_the_default_level_a_clean_run_prints_only_the_ready_line(default_model) -> None:  # type: ignore[no-untyped-def]
    """... and status() gives every process its uptime; busy_s and steps only where they mean something."""
    proc = subprocess.Popen([sys.executable, str(SERVE), "--model", str(default_model), "--stages", "2",
                             "--stage-threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready tcp://" in line

    async def status() -> dict:  # type: ignore[type-arg]
        async with AsyncClient(line.split("ready ")[1].split()[0], timeout=30) as c:
            return await c.status()

    by_role = {(p["role"], p["index"]): p for p in asyncio.run(status())["processes"]}
    assert set(by_role) == {("controller", 0), ("supervisor", 0), ("agent", 0), ("streamer", 0), ("stage", 0),
                            ("stage", 1)}
    for (role, _), p in by_role.items():
        if role == "stage":
            assert "busy_s" in p and "steps" in p
        else:
            assert p["uptime_s"] > 0 and "busy_s" not in p and "steps" not in p, p
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert stdout == "" and stderr == ""


def test_ctrl_c_at_the_terminal_stops_in_order_and_clients_hear_why(default_model) -> None:  # type: ignore[no-untyped-def]
    """SIGINT to dejavu-serve's whole process group (what a terminal's Ctrl-C sends): only the supervisor acts on
    it, so the controller still tells its clients, and everything exits cleanly."""
    from bus.errors import ServerError

    proc = subprocess.Popen([sys.executable, str(SERVE), "--model", str(default_model), "--stage-threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)  # its own group, as a shell gives a foreground job
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready tcp://" in line
    tree = descendants(proc.pid)

    async def scenario() -> Exception:
        async with AsyncClient(line.split("ready ")[1].split()[0], timeout=60, reconnect_timeout=60) as c:
            stream = c.stream(prompt_token_ids=[5, 6], max_new_tokens=2000)
            async with stream as s:
                async for _ in s:
                    os.killpg(proc.pid, signal.SIGINT)
                    break
            try:
                await c.generate(prompt_token_ids=[5, 6], max_new_tokens=2000)
            except Exception as e:  # noqa: BLE001 - the type is the point
                return e
            raise AssertionError("a request after Ctrl-C was served")

    err = asyncio.run(asyncio.wait_for(scenario(), 30))  # well before reconnect_timeout: told, not left to wait
    assert isinstance(err, ServerError), err
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not [p for p in tree if alive(p)]
