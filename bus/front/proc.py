"""The HTTP front's process: `python -m bus.front.proc '<FrontConfig JSON>'`, one entry point `run_front(config)`.

dejavu-serve starts it (`--http-port`) as one more supervised child (recovery/proc.py): Hello (with its HTTP
address) and heartbeats over the supervisor link, restarted by policy like the controller. It can also run on its
own (no supervisor_address) in front of any deployment it can reach. It is a client of the controller like any
other (bus/client.py: one ZeroMQ connection that reconnects and resumes by itself), so a slow or huge HTTP
crowd costs the controller nothing but its requests.

Owns: one uvloop loop and its TaskGroup (the supervisor link, the status poller), the aiohttp server
(bus/front/server.py), the text thread (tokenizer and chat template), the signals.
Stopping (SIGTERM/SIGINT, or Shutdown from the supervisor - which stops this process first, before the controller,
so the requests in flight still have a deployment): admission closes (new requests get 503, /ready says so),
the requests in flight finish - at most `drain_timeout` seconds, then the rest are cut with an error saying why -
and the server closes.
It must never: block its loop on tokenization, hold a request without a deadline (request_timeout), or hold
more than slots + max_queue requests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from bus.child import (
    EXIT_CONFIG,
    CannotStart,
    SupervisorLink,
    decode_config,
    install_uvloop,
    setup_child,
)
from bus.client import AsyncClient
from bus.codec import Codec
from bus.errors import DejaVuError
from bus.front.admission import Admission
from bus.front.auth import AuthConfigError, Keys, tls_context
from bus.front.config import FrontConfig
from bus.front.metrics import Metrics
from bus.front.server import Front
from bus.security import KeysError, maybe_load
from bus.sockets import context

log = logging.getLogger(__name__)
ROLE = "front"  # its name as a process of the deployment (its key, its envelopes' sender)
CLOSE_TIMEOUT = 2.0  # after the drain: how long the server waits for the last answers to be written


class FrontProcess:
    def __init__(self, cfg: FrontConfig) -> None:
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self.text_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="text")
        self.admission = Admission(cfg.max_queue)
        self.metrics = Metrics()
        self.link: SupervisorLink | None = None

    def _request_stop(self, why: str) -> None:
        if not self.stop.is_set():
            log.info("[drain] %s", why)
            self.stop_reason = why
            self.stop.set()

    async def run(self) -> int:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._request_stop, f"signal {signal.Signals(sig).name}")
        ctx = context()
        if cfg.supervisor_address:
            self.link = SupervisorLink(ctx, cfg.supervisor_address, Codec(ROLE, cfg.incarnation), ROLE, 0,
                                       maybe_load(cfg.keys_dir, ROLE))
        try:
            try:
                keys, tls = Keys(cfg.api_key_file), tls_context(cfg.tls_certfile, cfg.tls_keyfile)
            except AuthConfigError as e:
                return await self._cannot_start(str(e))
            loop.add_signal_handler(signal.SIGHUP, self._reload_keys, keys)
            try:
                tokenizer, max_prompt_bytes = await loop.run_in_executor(self.text_pool, self._load_tokenizer)
                client = AsyncClient(cfg.controller, timeout=cfg.request_timeout, connect_timeout=cfg.connect_timeout,
                                     probe=False, keys=cfg.client_keys_dir or None, key_name=cfg.client_key_name)
            except (CannotStart, KeysError) as e:
                return await self._cannot_start(str(e))
            async with client:
                return await self._serve(client, tokenizer, max_prompt_bytes, keys, tls)
        finally:
            if self.link is not None:
                self.link.close()
            ctx.destroy(linger=0)
            self.text_pool.shutdown(wait=False)

    def _reload_keys(self, keys: Keys) -> None:
        try:
            log.info("[auth] SIGHUP: %d API key(s) accepted now", keys.reload())
        except AuthConfigError as e:
            log.error("[auth] SIGHUP: the keys stay as they were: %s", e)

    async def _cannot_start(self, message: str) -> int:
        log.error("[startup] %s", message)
        if self.link is not None:
            await self.link.fatal(message)
        return EXIT_CONFIG

    def _load_tokenizer(self) -> tuple[Any, int]:  # on the text thread
        from bus.text import load_tokenizer, longest_token_bytes

        tokenizer = load_tokenizer(Path(self.cfg.model_dir))
        if tokenizer is None:
            raise CannotStart(f"the HTTP front needs the model's tokenizer, and {self.cfg.model_dir} has none (or "
                              "it does not load)")
        return tokenizer, self.cfg.max_seq_len * longest_token_bytes(tokenizer) * 4

    async def _serve(self, client: AsyncClient, tokenizer: Any, max_prompt_bytes: int, keys: Keys,
                     tls: ssl.SSLContext | None) -> int:
        cfg = self.cfg
        try:  # the deployment's slots bound the queue: known before the first request
            self._status(await client.status(cfg.connect_timeout))
        except DejaVuError as e:
            return await self._cannot_start(f"no status from the controller at {cfg.controller}: {e}")
        front = Front(cfg, client, tokenizer, self.admission, self.metrics, self.text_pool, max_prompt_bytes, keys)
        runner = web.AppRunner(front.app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=CLOSE_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(runner, cfg.host, cfg.port, backlog=4096, reuse_address=True, ssl_context=tls)
            await site.start()
        except OSError as e:
            await runner.cleanup()
            return await self._cannot_start(f"the HTTP front cannot listen on {cfg.host}:{cfg.port} ({e.strerror}): "
                                            "choose another --http-port or --http-host")
        host, port = runner.addresses[0][:2]
        url = f"{'https' if tls else 'http'}://{host if ':' not in host else f'[{host}]'}:{port}"
        log.info("[startup] front: %s (model %s%s) -> controller %s", url, cfg.served_name,
                 f"; {len(keys.keys)} API key(s)" if keys.keys else "; no API key", cfg.controller)
        if self.link is None:  # on its own: the ready line a script waits for (dejavu-serve prints its own)
            print(f"front: ready {url} (model {cfg.served_name}, controller {cfg.controller})", flush=True)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._poll(client))]
                if self.link is not None:
                    await self.link.hello({"http": url})
                    tasks.append(tg.create_task(self.link.run(cfg.heartbeat_interval, lambda: 0.0, self._state)))
                    tasks.append(tg.create_task(self._watch_link(self.link)))
                await self.stop.wait()
                await self._drain(front)
                for t in tasks:
                    t.cancel()
        finally:
            await runner.cleanup()
        return 0

    async def _watch_link(self, link: SupervisorLink) -> None:
        await link.stop.wait()
        self._request_stop(f"Shutdown from the supervisor ({link.stop_reason})")

    def _state(self) -> str:
        return "draining" if self.admission.draining else "serving"

    def _status(self, status: dict[str, Any] | None) -> None:
        self.admission.update(status)
        self.metrics.status.update(status)

    async def _poll(self, client: AsyncClient) -> None:
        """The deployment's status every status_interval (a timer, not a synchronisation): /metrics and /ready."""
        interval = self.cfg.status_interval
        while True:
            await asyncio.sleep(interval)
            try:
                status: dict[str, Any] | None = await client.status(max(interval, 1.0))
            except DejaVuError as e:
                log.warning("[status] no status from the controller: %s", e)
                status = None
            self._status(status)

    async def _drain(self, front: Front) -> None:
        a, timeout = self.admission, self.cfg.drain_timeout
        a.draining = self.stop_reason or "stopping"
        t0 = time.monotonic()
        log.info("[drain] %d request(s) in flight; new ones are refused; waiting up to %.0fs (drain_timeout)",
                 a.in_flight, timeout)
        try:
            await asyncio.wait_for(a.idle.wait(), timeout)
            log.info("[drain] every request finished in %.1fs", time.monotonic() - t0)
        except TimeoutError:
            log.warning("[drain] %d request(s) still in flight after %.0fs (drain_timeout): cutting them",
                        a.in_flight, timeout)
            front.abort(f"drain_timeout {timeout:g}s passed")
            try:
                await asyncio.wait_for(a.idle.wait(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.error("[drain] %d request(s) did not end after being cut", a.in_flight)


def raise_open_files(want: int) -> None:
    """Every HTTP connection is a file descriptor: raise the soft limit (often 1,024) toward `want`, within the
    hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def run_front(cfg: FrontConfig) -> int:
    setup_child("dejavu: front", cfg.log_level, cfg.supervisor_pid)
    install_uvloop()
    raise_open_files(2 * (cfg.max_queue + 4096))
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # no *_created series: this process's registry is /metrics
    return asyncio.run(FrontProcess(cfg).run())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bus.front.proc '<FrontConfig JSON>'", file=sys.stderr)
        return 2
    return run_front(decode_config(FrontConfig, args[0]))


if __name__ == "__main__":
    sys.exit(main())
