"""The HTTP front's configuration: one frozen dataclass, validated, passed on the command line of its process
(`python -m bus.front.proc '<FrontConfig JSON>'`) by the supervisor, or written by hand for a front of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FrontConfig:
    controller: str  # the controller's client address, tcp://host:port
    model_dir: str  # its tokenizer (and chat template) turn text into token ids here, not in the controller
    model_name: str = ""  # the model's id in the API ("" = the model directory's name)
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (its Hello and the ready line say which)
    max_seq_len: int = 2048  # the deployment's: longer prompts are refused (413) before they reach it
    # Requests admitted at once: the deployment's slots (from its status) plus max_queue waiting for one; the next
    # is refused at once (429) rather than queued without bound.
    max_queue: int = 1024
    request_timeout: float = 600.0  # each request's deadline, from its arrival to its last token
    drain_timeout: float = 30.0  # on SIGTERM (or Shutdown): how long requests in flight may take to finish
    status_interval: float = 1.0  # seconds between status polls of the controller (/metrics gauges, /ready)
    connect_timeout: float = 10.0  # the first status answer from the controller
    max_body_bytes: int = 16 << 20  # a larger request body is refused (413)
    # who may use it (bus/front/auth.py): a file of API keys (read by the front itself; plus $DEJAVU_API_KEY) and
    # a TLS certificate and key (PEM)
    api_key_file: str = ""
    tls_certfile: str = ""
    tls_keyfile: str = ""
    client_keys_dir: str = ""  # the users' keys (dejavu-keys generate) of a deployment with --keys
    client_key_name: str = "admin"  # which of them the front connects with (admin or client)
    keys_dir: str = ""  # the deployment's own keys: this process's key for the supervisor link ("" = plaintext)
    supervisor_address: str = ""  # "" = a front of its own: no supervisor link, stopped by SIGTERM/SIGINT
    supervisor_pid: int | None = None
    heartbeat_interval: float = 1.0
    incarnation: int = 0
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if "://" not in self.controller:
            raise ValueError(f"the controller address must look like tcp://host:port, got {self.controller!r}")
        if not 0 <= self.port < 65536:
            raise ValueError("--http-port must be in [0, 65535]")
        if self.max_seq_len < 2:
            raise ValueError("--max-seq-len must be >= 2")
        if self.max_queue < 0:
            raise ValueError("--max-queue must be >= 0")
        for name, v in (("--request-timeout", self.request_timeout), ("--drain-timeout", self.drain_timeout),
                        ("status_interval", self.status_interval), ("connect_timeout", self.connect_timeout),
                        ("heartbeat_interval", self.heartbeat_interval)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {v!r}")
        if self.client_key_name not in ("admin", "client"):
            raise ValueError(f"client_key_name must be admin or client, got {self.client_key_name!r}")

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).name
