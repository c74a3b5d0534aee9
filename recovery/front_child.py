"""The HTTP front as a child of dejavu-serve's supervisor (recovery/proc.py): its configuration, and which of
the users' keys it connects to the controller with.

The front is a client of the controller: with `--keys DIR` the controller's client socket admits the `client` and
`admin` keys only, so the front needs one of their secret halves in DIR (the `admin` one where present: it also
sees pids and addresses in status). `check_http` (called by recovery/preflight.py) refuses a deployment whose
front could not connect, or listen, before any process starts."""

from __future__ import annotations

from pathlib import Path

from bus.front.config import FrontConfig
from bus.security import ADMIN, CLIENT, KeysError, load
from recovery.specs import ChildSpec, DeploymentConfig

ROLE = "front"


def client_key_name(keys_dir: str) -> str:
    """The users' key the front connects with: admin where DIR holds its secret, else client (KeysError: neither)."""
    for name in (ADMIN, CLIENT):
        try:
            load(keys_dir, name)
            return name
        except KeysError:
            continue
    raise KeysError(f"{keys_dir} holds neither the admin nor the client secret key: the HTTP front connects to the "
                    "controller as a client and needs one of them (dejavu-keys generate DIR writes both)")


def front_config(cfg: DeploymentConfig, controller: str, supervisor: str = "", keys_dir: str = "",
                 supervisor_pid: int | None = None) -> FrontConfig:
    """The front of this deployment. `controller`: its client address as bound (a wildcard host is reached on the
    loopback); `supervisor`, `keys_dir`: the supervisor link and this deployment's own keys."""
    host, port = controller.removeprefix("tcp://").rsplit(":", 1)
    if host in ("0.0.0.0", "*", "[::]", "::"):
        controller = f"tcp://127.0.0.1:{port}"
    return FrontConfig(
        controller=controller, model_dir=cfg.model_dir, model_name=Path(cfg.model_dir).name, host=cfg.http_host,
        port=cfg.http_port or 0, max_seq_len=cfg.max_seq_len, max_queue=cfg.max_queue,
        request_timeout=cfg.request_timeout, drain_timeout=cfg.drain_timeout, api_key_file=cfg.api_key_file,
        tls_certfile=cfg.tls_certfile, tls_keyfile=cfg.tls_keyfile, client_keys_dir=cfg.keys_dir, client_key_name=client_key_name(cfg.keys_dir) if cfg.keys_dir else ADMIN,
        keys_dir=keys_dir, supervisor_address=supervisor, supervisor_pid=supervisor_pid,
        heartbeat_interval=cfg.heartbeat_interval, log_level=cfg.log_level,
    )


def front_spec(cfg: DeploymentConfig, controller: str, supervisor: str, keys_dir: str, pid: int) -> ChildSpec:
    return ChildSpec(ROLE, 0, "bus.front.proc", front_config(cfg, controller, supervisor, keys_dir, pid))
