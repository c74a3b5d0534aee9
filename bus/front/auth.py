"""Who may use the HTTP front: API keys (`Authorization: Bearer KEY`, as the `openai` client sends its api_key)
and TLS, so that a front beyond the loopback needs neither --insecure nor a proxy.

- Keys come from a file (`--api-key-file`: one key per line, `#` comments; several keys let a deployment rotate
  them) and from the environment (`DEJAVU_API_KEY`), never from a command line, where `ps` would show them. The
  front reads them itself at its start (its configuration names the file only), and again on SIGHUP.
- Every /v1/ route needs a key when any is set; /health, /ready and /metrics stay open (probes and scrapers hold
  no key; they show no request's content). A refusal is a 401 in the OpenAI error shape (`invalid_api_key`, what
  the `openai` client raises as AuthenticationError), counted in /metrics as outcome `unauthorized`.
- Keys compare in constant time (hmac.compare_digest), each against every key, so a refusal's timing says
  nothing of how much of a key matched.
- TLS: `--tls-certfile` / `--tls-keyfile` (PEM); TLS 1.2 at least."""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

ENV = "DEJAVU_API_KEY"
OPEN_PATHS = ("/health", "/ready", "/metrics")  # answered without a key


class AuthConfigError(ValueError):
    """An API key file or a TLS certificate that cannot be used: what to fix, in one line."""


def load_keys(path: str) -> tuple[str, ...]:
    """The keys of `path` ("" = none) and of $DEJAVU_API_KEY. Raises AuthConfigError for a file that cannot be read
    or holds no key, and for a key with whitespace inside (a pasted line break, a "Bearer " prefix)."""
    keys: list[str] = []
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise AuthConfigError(f"--api-key-file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise AuthConfigError(f"--api-key-file {path}: not a text file") from None
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise AuthConfigError(f"--api-key-file {path}: holds no key (one per line; # starts a comment)")
    value = os.environ.get(ENV, "").strip()
    if value:
        keys.append(value)
    for key in keys:
        if any(c.isspace() for c in key):
            raise AuthConfigError(f"an API key holds whitespace ({'--api-key-file ' + path if path else ENV}): give "
                                  "the key alone, without 'Bearer '")
    return tuple(dict.fromkeys(keys))


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext | None:
    """The server's TLS context (None without a certificate). Raises AuthConfigError for a half-given pair, a file
    that cannot be read, or a key that does not match its certificate."""
    if not certfile and not keyfile:
        return None
    if not (certfile and keyfile):
        raise AuthConfigError("TLS needs both --tls-certfile and --tls-keyfile")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as e:
        raise AuthConfigError(f"TLS: {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise AuthConfigError(f"TLS: --tls-certfile {certfile} / --tls-keyfile {keyfile} cannot be used: {e}") from None
    return ctx


class Keys:
    """The accepted keys (empty: every request passes), reloadable."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys = load_keys(path)

    def reload(self) -> int:
        """Read the keys again (SIGHUP); on a bad file the old keys stay. How many keys hold now."""
        self.keys = load_keys(self.path)
        return len(self.keys)

    def accepts(self, header: str | None) -> bool:
        if not self.keys:
            return True
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        raw = given.strip().encode()
        ok = False
        for key in self.keys:  # every key compared, whatever matched first
            ok |= hmac.compare_digest(raw, key.encode())
        return ok


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(keys: Keys, refused: Callable[[web.Request], web.StreamResponse]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """An aiohttp middleware that answers `refused(request)` to a /v1/ request without an accepted key."""

    @web.middleware
    async def authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or keys.accepts(request.headers.get("Authorization")):
            return await handler(request)
        return refused(request)

    return authenticated
