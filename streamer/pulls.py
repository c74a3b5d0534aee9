"""Pulls: a StreamRequest whose source pool lives on a peer streamer (restoring a replica, fetching a prompt's
KV). This streamer asks the peer (PullRequest) to push the region into our pool and answers its client once the
pushed transfer committed here - or with the peer's PullFailed, the deadline, or PeerDeadError when the peer
goes silent on our data socket for peer_timeout_s. Runs on the event loop, part of StreamerService.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from bus.messages import Msg
from streamer import wire
from streamer.errors import BadRequestError, PeerDeadError, StreamerError
from streamer.planning import transfer_options
from streamer.regions import check_region, region_from_spec, region_to_spec


class Pulls:
    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self._ids = itertools.count(1)
        # (peer, pull id) -> resolved by the data plane when the pushed transfer commits here
        self.waiters: dict[tuple[str, int], asyncio.Future[None]] = {}

    async def start(self, who: Any, msg: wire.StreamRequest) -> Msg | None:
        """Source on a peer: ask it to push into our pool; answer our client when the data committed here."""
        if len(msg.routes) != 1 or msg.routes[0].dst.streamer not in ("", self.svc.config.name):
            raise BadRequestError("a pull (remote source) has exactly one route, into a pool of this streamer")
        r = msg.routes[0]
        dst = self.svc.pools.get(r.dst.pool)
        dst_region = region_from_spec(r.region)
        check_region(dst.layout, dst_region, f"destination region of pool {dst.name!r}")
        check, buffered, deadline = transfer_options(self.svc.config, msg)
        peer = self.svc.peers.link(msg.src.streamer)
        pull = next(self._ids)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters[(peer.name, pull)] = done
        failed = peer.expect(("pull", pull))
        src_region = region_from_spec(msg.region).sub_layers(*r.src_layers)
        # a pull's bytes come from another streamer: checksummed unless the request or an "off" default says no
        req = wire.PullRequest(pull, msg.src.pool, region_to_spec(src_region), dst.name, r.region,
                               True if check is None else check, buffered,
                               deadline, msg.tag, list(msg.notify), who.identity, pull)
        self.svc.spawn(self._wait(who, msg, peer, req, done, failed, deadline), f"pull-{pull}")
        return None

    async def _wait(self, who: Any, msg: wire.StreamRequest, peer: Any, req: wire.PullRequest,
                    done: asyncio.Future[None], failed: asyncio.Future[Msg], deadline: float) -> None:
        """Wait for the pushed data to commit here, the peer's PullFailed, or trouble: the whole deadline, or
        the peer silent on our data socket for peer_timeout_s (a source that died mid-pull)."""
        t0 = time.monotonic()
        pt = self.svc.config.peer_timeout_s
        answer: Msg
        try:
            await peer.send(req)
            while True:
                left = deadline - (time.monotonic() - t0)
                finished, _ = await asyncio.wait({done, failed}, timeout=max(0.0, min(pt, left)),
                                                 return_when=asyncio.FIRST_COMPLETED)
                if finished or left <= 0:
                    break
                if time.monotonic() - max(self.svc.last_heard.get(peer.name, t0), t0) > pt:
                    raise PeerDeadError(f"peer streamer {peer.name} went silent for {pt:.1f}s during a pull "
                                        f"(setting: peer_timeout_s)")
            if done in finished:
                nbytes = region_from_spec(req.dst_region).nbytes(self.svc.pools.get(req.dst_pool).layout)
                answer = wire.TransferDone(msg.xfer, msg.tag, nbytes, time.monotonic() - t0, req.checksum)
            elif failed in finished:
                f = failed.result()
                answer = wire.TransferFailed(msg.xfer, msg.tag, f.code, f"{peer.name}: {f.message}")
            else:
                answer = wire.TransferFailed(msg.xfer, msg.tag, wire.XFER_TIMEOUT,
                                             f"pull from {peer.name} not done within {deadline:.1f}s")
        except StreamerError as e:
            answer = wire.TransferFailed(msg.xfer, msg.tag, e.code, str(e))
        finally:
            self.waiters.pop((peer.name, req.pull), None)
            peer.forget(("pull", req.pull))
        await self.svc.outbox.control(who.identity, answer, who.msg_id)
