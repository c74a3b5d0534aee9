"""Who is speaking: CurveZMQ keys for every process of a deployment, and the check that a message's sender is the
authenticated peer, never a name written inside the message.

A deployment has one keypair per process name ("controller", "supervisor", "streamer-0", "stage-3", ...), made at
start (`generate`) into a directory only the deployment's user can read, as `<name>.key_secret` files and one
`public.json` table. Every socket a process binds is a CURVE server with its own key; every socket it connects
is a CURVE client with its own key that names the server's public key. A ZAP handler in each binding process
(pyzmq's authenticator, on a thread of its own so a busy event loop cannot stall a handshake) admits exactly the
deployment's public keys and tags every message of a connection with the peer's process name (ZeroMQ's
"User-Id"). `decode_frames` (bus/sockets.py) then refuses a message whose envelope names another sender. So a
local process without the keys cannot connect to any socket of the deployment, and a member cannot speak for
another one. Encryption comes with CURVE.

The client-facing socket is a different trust domain: its keys are the user's (`dejavu-keys generate DIR`
writes `server`, `agent`, `client` and `admin` keypairs with the same format), and the controller's client
socket is a CURVE server with the `server` key whose ZAP domain (CLIENT_DOMAIN) admits exactly the `client` and
`admin` public keys, under those names as User-Id. The domains never mix: a client key opens no internal socket,
and no member key is needed to be a client. Clients name themselves in their envelopes as they like, so there the
User-Id tells who may see what (an administrator sees pids and addresses in status), not who sent a message.

Without keys (standalone tools and tests of a single library piece) sockets are plaintext and nothing is
checked: `Keyring` is None there.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

PUBLIC_TABLE = "public.json"
SUPERVISOR, CONTROLLER = "supervisor", "controller"  # process names (= their envelopes' sender)
ZAP_DOMAIN = "dejavu"  # the deployment's members, on every internal socket
CLIENT_DOMAIN = "clients"  # the users' client and admin keys, on the controller's client socket only
SERVER, AGENT, CLIENT, ADMIN = "server", "agent", "client", "admin"
USER_KEYS = (SERVER, AGENT, CLIENT, ADMIN)  # the keypairs `dejavu-keys generate` writes
CLIENT_NAMES = (CLIENT, ADMIN)  # the keys the client socket admits (their User-Id)
USER_ID = "User-Id"  # ZeroMQ's message property set from the ZAP handler's answer
PEER_ADDRESS = "Peer-Address"  # ZeroMQ's message property: the IP address of a TCP peer


class KeysError(ValueError):
    """A keys directory is missing, unreadable or does not hold this process's key."""


@dataclass(frozen=True)
class Keyring:
    """One process's view of the deployment's keys: its own keypair and every member's public key."""

    name: str
    public: dict[str, bytes]  # process name -> Z85 public key
    secret: bytes  # this process's Z85 secret key

    @property
    def own_public(self) -> bytes:
        return self.public[self.name]

    def server_key(self, server: str) -> bytes:
        try:
            return self.public[server]
        except KeyError:
            raise KeysError(f"no public key for {server!r} among the deployment's keys") from None


def generate(directory: Path | str, names: list[str]) -> None:
    """Make a keypair for every name (0600 files in a 0700 directory); keeps the names it has already."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    table_path = d / PUBLIC_TABLE
    table: dict[str, str] = json.loads(table_path.read_text()) if table_path.is_file() else {}
    for name in names:
        if name in table:
            continue
        public, secret = zmq.curve_keypair()
        _write_private(d / f"{name}.key_secret", secret)
        table[name] = public.decode("ascii")
    tmp = d / f".{PUBLIC_TABLE}.tmp"
    _write_private(tmp, json.dumps(table, indent=1).encode())
    tmp.replace(table_path)


def install(directory: Path | str, public: dict[str, str], secrets: dict[str, bytes]) -> None:
    """Write keys made elsewhere (a host agent receives its processes' keys when it joins): the public table as
    given and the named secret keys, in generate()'s format and modes."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name, secret in secrets.items():
        if "/" in name or name.startswith("."):
            raise KeysError(f"bad key name {name!r}")
        _write_private(d / f"{name}.key_secret", secret)
    tmp = d / f".{PUBLIC_TABLE}.tmp"
    _write_private(tmp, json.dumps(public, indent=1).encode())
    tmp.replace(d / PUBLIC_TABLE)


def read_table(directory: Path | str) -> dict[str, str]:
    """The public table of a keys directory (process name -> Z85 public key)."""
    try:
        return json.loads((Path(directory) / PUBLIC_TABLE).read_text())
    except (OSError, ValueError) as e:
        raise KeysError(f"{directory}: cannot read {PUBLIC_TABLE} ({e})") from None


def read_secret(directory: Path | str, name: str) -> bytes:
    try:
        return (Path(directory) / f"{name}.key_secret").read_bytes().strip()
    except OSError as e:
        raise KeysError(f"{directory}: cannot read the secret key of {name!r} ({e.strerror})") from None


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def load(directory: Path | str, name: str) -> Keyring:
    d = Path(directory)
    try:
        table = json.loads((d / PUBLIC_TABLE).read_text())
        secret = (d / f"{name}.key_secret").read_bytes().strip()
    except (OSError, ValueError) as e:
        raise KeysError(f"{d}: cannot read the keys of {name!r} ({e})") from None
    if name not in table:
        raise KeysError(f"{d}: no public key for {name!r}")
    return Keyring(name, {k: v.encode("ascii") for k, v in table.items()}, secret)


def maybe_load(directory: str, name: str) -> Keyring | None:
    """The keyring of `name` from `directory`, or None where no directory is given (plaintext)."""
    return load(directory, name) if directory else None


def load_client_side(directory: Path | str) -> Keyring:
    """The client socket's keys from a user's `dejavu-keys` directory: the `server` keypair, and the `client` and
    `admin` public keys it admits."""
    keyring = load(directory, SERVER)
    missing = [n for n in CLIENT_NAMES if n not in keyring.public]
    if missing:
        raise KeysError(f"{directory}: no public key for {', '.join(map(repr, missing))} (written by "
                        "`dejavu-keys generate`)")
    return keyring


def as_server(sock: zmq.Socket, keyring: Keyring | None, domain: str = ZAP_DOMAIN) -> None:
    """Make `sock` (before bind) a CURVE server with this process's key; the ZAP handler admits the client keys
    of `domain` (the deployment's members, or CLIENT_DOMAIN: the users' client and admin keys)."""
    if keyring is None:
        return
    sock.curve_secretkey = keyring.secret
    sock.curve_publickey = keyring.own_public
    sock.curve_server = True
    sock.zap_domain = domain.encode()


def as_client(sock: zmq.Socket, keyring: Keyring | None, server: str) -> None:
    """Make `sock` (before connect) a CURVE client with this process's key, talking to process `server`."""
    if keyring is None:
        return
    sock.curve_secretkey = keyring.secret
    sock.curve_publickey = keyring.own_public
    sock.curve_serverkey = keyring.server_key(server)


class _Admission:
    """The ZAP handler's tables, one per domain: the client keys admitted there -> their names (the User-Id)."""

    def __init__(self, domains: dict[str, dict[bytes, str]]) -> None:
        self.domains = domains
        self.admitted = ""  # the name of the key the last callback admitted (see _NamingAuthenticator)

    def callback(self, domain: str, key: bytes) -> bool:
        self.admitted = self.domains.get(domain, {}).get(key, "")
        return bool(self.admitted)


class _NamingAuthenticator(ThreadAuthenticator):
    """pyzmq asks for the User-Id (curve_user_id) without the domain, right after the callback admitted the key:
    on the authenticator's one thread, with nothing in between (the callback is synchronous). So the name comes
    from the table of the domain that admitted the key, even if a key were in two tables."""

    def __init__(self, context: zmq.Context, admission: _Admission) -> None:
        super().__init__(context)
        self.admission = admission

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.admission.admitted or "?"


def start_authenticator(ctx: zmq.Context, keyring: Keyring | None,
                        clients: Keyring | None = None) -> ThreadAuthenticator | None:
    """Run the ZAP handler for the sockets this process binds (call once per context, before binding): the
    deployment's members on ZAP_DOMAIN (with `keyring`), and the users' client and admin keys on CLIENT_DOMAIN
    (with `clients`, from load_client_side). Returns it (stop() it before destroying the context), or None
    without keys."""
    domains: dict[str, dict[bytes, str]] = {}
    if keyring is not None:
        domains[ZAP_DOMAIN] = {v: k for k, v in keyring.public.items()}
    if clients is not None:
        domains[CLIENT_DOMAIN] = {clients.public[n]: n for n in CLIENT_NAMES}
    if not domains:
        return None
    admission = _Admission(domains)
    auth = _NamingAuthenticator(zmq.Context.shadow(ctx.underlying), admission)
    auth.start()
    for domain in domains:
        auth.configure_curve_callback(domain=domain, credentials_provider=admission)
    return auth


def _property(frame: object, name: str) -> str | None:
    """A ZeroMQ message property of a received frame (None when absent or the frame is not a zmq.Frame)."""
    get = getattr(frame, "get", None)
    if get is None:
        return None
    try:
        return get(name) or None
    except zmq.ZMQError:
        return None


def peer_of_frame(frame: object) -> str | None:
    """The authenticated process name of the connection a received frame came from, or None (plaintext)."""
    return _property(frame, USER_ID)


def loopback_host(host: str) -> bool:
    """Whether `host` (an interface to bind, or a peer's address) is this machine's loopback only: localhost,
    127.0.0.0/8, ::1 (also as [::1] or IPv4-mapped). Names other than localhost are not resolved: not loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def from_loopback(frame: object) -> bool:
    """Whether a received frame came over a TCP connection from this machine's loopback (False when unknown)."""
    value = _property(frame, PEER_ADDRESS)
    return value is not None and loopback_host(value)
