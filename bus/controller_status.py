"""What status() reports: every process's state and counts, the deployment's state, its replicas and recoveries,
the memory plan - and what a client that is no administrator sees of it.

Runs in the controller process: a mixin of its shell (bus/controller_proc.py), which owns the state read here
(the stage registry, the core's counts, the replicas' book) and the sockets; kept apart so each file says one
thing. It only reads: building a reply never changes the deployment.

A client sees in status() what it needs (states, counts, health); pids, host names, internal addresses and the
model path only an administrator (`redacted`, `_is_admin`): with client keys the holder of the `admin` key, else a
peer on the loopback.
"""

from __future__ import annotations

import json
import os
import socket
import time

import msgspec

from bus.child import STARTED
from bus.messages import MemoryInfo, ProcessInfo, StageStats, StatusReply
from bus.security import ADMIN, from_loopback, peer_of_frame
from bus.sockets import bound_address


class StatusReporting:
    """Methods of ControllerProcess (its attributes are the shell's)."""

    def _status(self) -> StatusReply:
        now = time.time()
        procs = [ProcessInfo("controller", 0, os.getpid(), self.cfg.incarnation, self._state(), socket.gethostname(),
                             bound_address(self.internal), uptime_s=now - STARTED)]
        for i in range(self.cfg.num_stages):
            e = self.reg.stages.get(i)
            pipeline = self.cfg.pipeline(i)
            if e is None:
                procs.append(ProcessInfo("stage", i, 0, -1, "starting", pipeline=pipeline))
            else:
                st = e.stats or StageStats(0.0, 0, 0.0)
                idle = max(0.0, 1.0 - st.busy_s / st.uptime_s) if st.uptime_s > 0 else None
                procs.append(ProcessInfo("stage", i, e.pid, e.incarnation, e.state, e.host, e.data, st.busy_s,
                                         st.steps, st.uptime_s, pipeline, idle,
                                         st.kv_bytes if pipeline == "prompt" else None, st.swap))
        procs.extend(msgspec.structs.replace(info, uptime_s=max(0.0, now - self.reg.started.get(key, now)))
                     for key, info in self.reg.others.items())
        waiting, running = self.core.counts()
        d = self.disagg
        return StatusReply(procs, self.cfg.model_dir, self.cfg.num_stages, self.epoch, waiting, running,
                           self.cfg.num_microbatches * self.cfg.microbatch_size, list(self.reg.hosts),
                           self._deployment_state(), self._replica_status(), list(self.recoveries),
                           self.cfg.prompt_stages, d.receive_waiting if d else 0, d.receive_waits if d else 0,
                           d.landed_bytes if d else 0, self.cfg.microbatch_size, *memory_plan(self.cfg.memory_plan),
                           self.core.sched.lookahead, self.core.dropped_rows)

    def _deployment_state(self) -> str:
        if self.fatal or self.stopping:
            return "stopping"
        if self.reg.unplaced:
            return "degraded"  # a stage has no host to run on: requests wait (queue_timeout) for a host to join
        return "serving" if self.core.ready else "starting"

    def _is_admin(self, head: object) -> bool:
        """Who sees the deployment's pids, host names, internal addresses and model path in status(). With client
        keys: the holder of the `admin` key (the User-Id its connection was admitted under). Without: a peer on
        this machine's loopback - a plaintext client socket binds the loopback only (dejavu-serve refuses
        anything else without --insecure), and the machine's users see the pids with ps anyway; a peer from
        elsewhere (an --insecure deployment) is a client."""
        if self.client_keys is not None:
            return peer_of_frame(head) == ADMIN
        return from_loopback(head)


def memory_plan(text: str) -> tuple[str, list[MemoryInfo]]:
    """ControllerConfig.memory_plan as status() reports it: how the microbatch size was chosen, and each stage's
    memory split."""
    if not text:
        return "", []
    plan = json.loads(text)
    return plan.get("how", ""), [MemoryInfo(**s) for s in plan.get("stages", [])]


def redacted(reply: StatusReply) -> StatusReply:
    """status() as a client that is no administrator sees it: what it needs (every process's role, index,
    incarnation and state, stages' busy time, steps and uptime, queue counts, slots, the deployment's state and
    its hosts' states), not where the deployment
    runs or listens (pids, hosts' names and addresses, internal addresses, the model path). Hosts keep their id,
    state, devices and stages: which host is down is health. Blanked rather than left out: the message keeps its
    shape for every client."""
    procs = [msgspec.structs.replace(p, pid=0, host="", detail="") for p in reply.processes]
    hosts = [msgspec.structs.replace(h, address="", pid=0, hostname="") for h in reply.hosts]
    return msgspec.structs.replace(reply, processes=procs, hosts=hosts, model="")
