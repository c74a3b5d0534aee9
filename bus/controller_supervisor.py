"""The controller's supervisor side: what the supervisor tells it - a process down (ProcessDown), a fatal error
(FatalError), the hosts and which stages have none (HostsUpdate), and the identities of the processes that are not
stages (their Hello, forwarded: the supervisor itself, the agents, the streamers) for status().

Runs in the controller process: a mixin of its shell (bus/controller_proc.py), which owns the supervisor link (its
`on_message` is `_on_supervisor`) and the state; kept apart so each file says one thing. When a stage is reported
down the pipeline stops and the survivors are told at once (EpochOver), so they abort that epoch's links then, not
when the next epoch's replace them; its successor's Hello starts the next epoch (bus/controller_stages.py).
"""

from __future__ import annotations

import logging
import time

from bus.codec import Received
from bus.messages import (
    ERR_SERVER,
    EpochOver,
    FatalError,
    Hello,
    HostsUpdate,
    ProcessDown,
    ProcessInfo,
)
from bus.sockets import send

log = logging.getLogger(__name__)


class SupervisorSide:
    """Methods of ControllerProcess (its attributes are the shell's)."""

    async def _on_supervisor(self, msg: Received) -> None:
        body = msg.body
        if isinstance(body, ProcessDown):
            if body.role == "stage":
                entry = self.reg.stages.get(body.index)
                if entry is not None and entry.incarnation > body.incarnation:
                    return  # its successor already said Hello
                log.warning("[recovery] stage %d incarnation %d down (%s); %s", body.index, body.incarnation,
                            body.reason, "restarting" if body.restarting else "not restarting")
                if entry is not None:
                    entry.state = "restarting" if body.restarting else "failed"
                self.down_at.setdefault(body.index, time.monotonic())
                self.core.pipeline_down()
                self.pending_acks = set()
                self.restoring = {}
                # the survivors abort this epoch's links now, not when the next epoch's links replace them
                for i, e in self.reg.stages.items():
                    if i != body.index and e.state not in ("restarting", "failed"):
                        await send(self.internal, self.codec, EpochOver(self.epoch), route=[f"stage-{i}".encode()])
            else:
                key = (body.role, body.index)
                if key in self.reg.others:
                    old = self.reg.others[key]
                    self.reg.others[key] = ProcessInfo(old.role, old.index, old.pid, old.incarnation,
                                                       "restarting" if body.restarting else "dead", old.host,
                                                       body.reason)
                known = self.reg.others.get(key)
                if body.role == "streamer" and known is not None and known.host in self.streamers:
                    del self.streamers[known.host]  # its replica pools are gone with it
                    if self.disagg is not None:
                        # no prompt's KV can move through that host until its streamer is back (its Hello relinks):
                        # pause rather than let passes fail their tries meanwhile
                        log.warning("[topology] the streamer of %s is down: serving pauses until it is back",
                                    known.host)
                        self.core.pipeline_down()
                        self.pending_acks = set()
        elif isinstance(body, FatalError):
            self.fatal = body.message
            log.info("[fatal] failing %d request(s): %s", len(self.core.requests), body.message)
            self.core.pipeline_down()
            self.core.fail_all(ERR_SERVER, body.message)
            await self._flush()
            await self._tell_clients(body.message)
        elif isinstance(body, HostsUpdate):
            self.reg.hosts, self.reg.unplaced = list(body.hosts), list(body.unplaced)
        elif isinstance(body, Hello):
            # the supervisor forwards other processes' identities (itself, the agents, the streamers) for status()
            incarnation = body.incarnation if body.incarnation >= 0 else msg.env.incarnation
            self.reg.others[(body.role, body.index)] = ProcessInfo(
                body.role, body.index, body.pid, incarnation, "serving", body.host,
                " ".join(body.addresses.values()))
            if body.role == "streamer" and body.addresses.get("data"):
                old_streamer = self.streamers.get(body.host)
                self.streamers[body.host] = (f"streamer-{body.index}", body.addresses["data"], body.pid)
                if self.disagg is not None and old_streamer != self.streamers[body.host] and not self.pending_acks:
                    # the prompt stages must learn where this streamer is now (or it is the one a relink waited for)
                    self.core.pipeline_down()
                    await self._relink()
            self.reg.started[(body.role, body.index)] = body.started
