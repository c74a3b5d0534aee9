"""dejavu-serve's HTTP flags: a mistake is one line on stderr saying what to change, exit code 2, before any
process starts."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

from bus.security import generate
from tests.recovery.test_startup import one_line, serve


def test_http_usage_mistakes_are_one_line_and_exit_code_2(default_model: Path, model_factory,  # type: ignore[no-untyped-def]
                                                          tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate(keys, ["server", "agent", "client", "admin"])
    for name in ("client", "admin"):
        (keys / f"{name}.key_secret").unlink()  # handed out to the users: the server keeps neither
    no_tokenizer = model_factory("llama")
    api_keys, empty = tmp_path / "api-keys", tmp_path / "empty"
    api_keys.write_text("a-key\n")
    empty.write_text("# none yet\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cases = {
            ("--http-port", str(port)): f"--http-port {port}: already in use",
            ("--http-port", "0", "--http-host", "0.0.0.0"): "--http-host 0.0.0.0: the HTTP front has no API key",
            ("--http-port", "0", "--http-host", "0.0.0.0", "--api-key-file", str(api_keys)):
                "--http-host 0.0.0.0: the HTTP front has no TLS",
            ("--http-port", "0", "--api-key-file", str(tmp_path / "none")): f"--api-key-file {tmp_path / 'none'}: "
                                                                           "No such file",
            ("--http-port", "0", "--api-key-file", str(empty)): "holds no key",
            ("--http-port", "0", "--tls-certfile", str(api_keys)): "TLS needs both --tls-certfile and --tls-keyfile",
            ("--http-port", "0", "--tls-certfile", str(api_keys), "--tls-keyfile", str(api_keys)): "cannot be used",
            ("--http-port", "0", "--keys", str(keys)): "holds neither the admin nor the client secret key",
            ("--http-port", "0", "--max-queue", "-1"): "--max-queue must be >= 0",
            ("--http-port", "0", "--drain-timeout", "0"): "--drain-timeout must be > 0",
            ("--http-port", "0", "--model", str(no_tokenizer)): "has no tokenizer files",
        }
        for args, expected in cases.items():
            model = () if "--model" in args else ("--model", str(default_model))
            out = serve(*model, *args)
            assert out.returncode == 2 and expected in one_line(out.stderr), (args, out.stderr)
    shutil.rmtree(keys)
