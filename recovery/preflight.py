"""What `dejavu-serve` checks before it starts any process: the model directory, the layer split, who can reach
the client socket (keys, or the loopback only), the client port, the devices, the shared memory the KV pools
need. Each refusal is one `UsageError` line that says what to change (the command exits with code 2); a shortage
that only costs a feature is a warning line.

Torch-free, like the rest of the supervisor: these checks take milliseconds, where one process importing
torch takes seconds.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from bus.security import KeysError, load, load_client_side, loopback_host
from recovery.specs import DeploymentConfig
from stages.errors import StageError
from stages.models.spec import (
    RANDOM_WEIGHTS_KEY,
    ModelSpec,
    read_config,
    read_spec,
    weight_files,
)
from streamer.config import SHM_DIR

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class UsageError(ValueError):
    """The deployment cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class Checked:
    spec: ModelSpec
    warnings: tuple[str, ...]


def check_deployment(cfg: DeploymentConfig) -> Checked:
    spec = check_model(Path(cfg.model_dir))
    check_layout(cfg, spec)
    warnings = check_exposure(cfg)
    check_port(cfg.host, cfg.port)
    if cfg.http_port is not None:
        warnings += check_http(cfg)
    if cfg.device == "cuda" and cfg.hosts:
        check_gpus(cfg)
    if cfg.device == "cpu" and cfg.streamer:
        warnings += shm_shortage(cfg, spec)
    return Checked(spec, tuple(warnings))


def check_model(model_dir: Path) -> ModelSpec:
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: no such directory; give a Hugging Face model directory "
                         "(config.json, *.safetensors, tokenizer files) or 'default'")
    try:
        spec = read_spec(model_dir)
        if RANDOM_WEIGHTS_KEY not in read_config(model_dir):
            weight_files(model_dir)
    except StageError as e:
        raise UsageError(f"--model {model_dir}: {e}") from None
    return spec


def check_layout(cfg: DeploymentConfig, spec: ModelSpec) -> None:
    if cfg.disaggregated:
        for flag, n in (("--prompt-stages", cfg.prompt_stages), ("--token-stages", cfg.token_stages)):
            if n > spec.num_layers:
                raise UsageError(f"{flag} {n}: the model has {spec.num_layers} layers; choose 1 to "
                                 f"{spec.num_layers} stages")
    elif cfg.num_stages > spec.num_layers:
        raise UsageError(f"--stages {cfg.num_stages}: the model has {spec.num_layers} layers; "
                         f"choose 1 to {spec.num_layers} stages")
    cfg.stage_plan(spec.num_layers)
    if spec.max_positions and cfg.max_seq_len > spec.max_positions:
        raise UsageError(f"--max-seq-len {cfg.max_seq_len}: the model has {spec.max_positions} positions; "
                         f"choose at most {spec.max_positions}")


def check_exposure(cfg: DeploymentConfig) -> list[str]:
    """Who can talk to the client socket. With --keys: whoever holds the client or admin key (CURVE; the keys
    must load now, not when the controller starts). Without, the socket is plaintext: anyone who reaches it can
    send requests, read the outputs and see pids in status(), so it binds the loopback only - anything else is
    refused unless --insecure says so (then a warning)."""
    if cfg.keys_dir:
        try:
            load_client_side(cfg.keys_dir)
            load(cfg.keys_dir, "agent")
        except KeysError as e:
            raise UsageError(f"--keys: {e}; make the keys with `dejavu-keys generate DIR`") from None
        return []
    # agents of other machines authenticate with the users' `agent` key: without --keys only the local (simulated)
    # hosts can join, which makes a deployment without local hosts, or listening for agents beyond the loopback,
    # one that no agent can ever join
    if cfg.hosts == 0:
        raise UsageError("--hosts 0: stages run only on agents of other machines, which join with the keys of "
                         "--keys DIR (made by `dejavu-keys generate DIR`); give --keys")
    agent_host = cfg.agent_bind.removeprefix("tcp://").rsplit(":", 1)[0]
    if not loopback_host(agent_host):
        raise UsageError(f"--agent-bind {cfg.agent_bind}: agents of other machines join with the keys of --keys DIR "
                         "(made by `dejavu-keys generate DIR`); give --keys, or bind the loopback")
    if loopback_host(cfg.host):
        return []
    if not cfg.insecure:
        raise UsageError(f"--host {cfg.host}: a client socket beyond this machine's loopback needs keys: give "
                         "--keys DIR (made by `dejavu-keys generate DIR`), or --insecure to serve it plaintext to "
                         "anyone who can reach it")
    return [f"--host {cfg.host} --insecure: the client socket is plaintext and unauthenticated; anyone who can "
            "reach it can send requests and read every output (--keys DIR authenticates and encrypts)"]


def check_port(host: str, port: int) -> None:
    """The client socket's address must be free (ZeroMQ binds with SO_REUSEADDR, so the probe does too)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
            s.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UsageError(f"--port {port}: already in use on {host}; stop what listens there or choose "
                                 "another port (--port 0 picks a free one)") from None
            raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def check_http(cfg: DeploymentConfig) -> list[str]:
    """The HTTP front: its settings, its port, the key it connects to the controller with (--keys), the tokenizer
    it needs, its API keys and TLS files, and who can reach it: beyond the loopback only with API keys over TLS,
    or with --insecure."""
    from bus.front.auth import ENV, AuthConfigError, load_keys, tls_context
    from bus.text import has_tokenizer
    from recovery.front_child import front_config

    try:
        front_config(cfg, "tcp://127.0.0.1:1")
    except KeysError as e:
        raise UsageError(f"--http-port with --keys: {e}") from None
    if not has_tokenizer(Path(cfg.model_dir)):
        raise UsageError(f"--http-port: the HTTP front serves text, and --model {cfg.model_dir} has no tokenizer files")
    try:
        keys = load_keys(cfg.api_key_file)
        tls = tls_context(cfg.tls_certfile, cfg.tls_keyfile) is not None
    except AuthConfigError as e:
        raise UsageError(str(e)) from None
    if cfg.http_port:
        try:
            check_port(cfg.http_host, cfg.http_port)
        except UsageError as e:
            raise UsageError(str(e).replace("--port", "--http-port").replace("--host", "--http-host")) from None
    if loopback_host(cfg.http_host) or (keys and tls):
        return []
    if not cfg.insecure:
        missing = "no TLS: its API keys would cross the network in the clear" if keys else "no API key"
        raise UsageError(f"--http-host {cfg.http_host}: the HTTP front has {missing}; beyond this machine's loopback "
                         f"give --api-key-file (or ${ENV}) with --tls-certfile and --tls-keyfile, or --insecure (or "
                         "put an authenticating proxy in front of a loopback one)")
    if keys:
        return [f"--http-host {cfg.http_host} --insecure: the HTTP API is plaintext; its API keys cross the network "
                "in the clear"]
    return [f"--http-host {cfg.http_host} --insecure: the HTTP API is plaintext and unauthenticated; anyone who can "
            "reach it can send requests"]


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch: the driver's list (or device nodes),
    narrowed by CUDA_VISIBLE_DEVICES when it is set."""
    listed = Path("/proc/driver/nvidia/gpus")
    if listed.is_dir():
        count = len(list(listed.iterdir()))
    else:
        count = len([p for p in Path("/dev").glob("nvidia[0-9]*")])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))
    return count


def check_gpus(cfg: DeploymentConfig) -> None:
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("--device cuda: torch is not installed") from None
    if version.endswith("+cpu"):
        raise UsageError(f"--device cuda: the installed torch {version} is a CPU build; install a CUDA build "
                         "(see README, 'On a GPU machine') or use --device cpu")
    gpus = visible_gpus()
    if gpus == 0:
        raise UsageError("--device cuda: no NVIDIA GPU is visible (no driver in /proc/driver/nvidia, or "
                         "CUDA_VISIBLE_DEVICES hides them all); use --device cpu")
    if cfg.num_stages > gpus:
        raise UsageError(f"--stages {cfg.num_stages} --device cuda: each stage takes one GPU and {gpus} are "
                         f"visible; choose at most {gpus} stages")
    per_host = -(-cfg.num_stages // cfg.hosts)  # a simulated host's GPUs: its block of stages
    if per_host * (cfg.hosts + cfg.spare_hosts) > gpus:
        raise UsageError(f"--hosts {cfg.hosts} --spare-hosts {cfg.spare_hosts} --device cuda: each simulated host "
                         f"takes {per_host} of this machine's {gpus} GPU(s); use fewer hosts or spares")
    if cfg.transport in ("auto", "nccl") and importlib.util.find_spec("cupy") is None:
        raise UsageError("--device cuda: the activation plane uses NCCL through CuPy, which is not installed; "
                         "pip install 'dejavu-serving[cuda12]' (or [cuda13]), or use --transport zmq")


def pool_bytes(cfg: DeploymentConfig, spec: ModelSpec, pipeline: str = "") -> int:
    """Bytes of every stage's KV pool together (pipeline: only those of its stages, e.g. "token")."""
    per_token_layer = 2 * spec.num_kv_heads * spec.head_dim * DTYPE_BYTES[cfg.dtype]
    slot_layers = sum((p.layers[1] - p.layers[0]) * p.num_slots for p in cfg.stage_plan(spec.num_layers)
                      if not pipeline or p.pipeline == pipeline)
    return slot_layers * cfg.max_seq_len * per_token_layer


def shm_shortage(cfg: DeploymentConfig, spec: ModelSpec) -> list[str]:
    need = pool_bytes(cfg, spec)
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return [f"{SHM_DIR} is not available: stages keep their KV in private memory, so a restarted stage "
                "recomputes its requests instead of taking its KV over"]
    free = st.f_bavail * st.f_frsize
    if free < need:
        return [f"{SHM_DIR} has {free / 2**20:.0f} MiB free and the KV pools need {need / 2**20:.0f} MiB: stages "
                "that find no room keep their KV in private memory (a restart recomputes their requests); "
                "lower --microbatch-size or --max-seq-len, or grow /dev/shm"]
    return []
