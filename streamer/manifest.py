"""The streamer's manifest: the shared-memory stage pools it maps, recorded in a small JSON file so that a
restarted streamer adopts them. A CPU stage's pool is a file in /dev/shm and survives the streamer's death
(kill -9, a crash); without a record, the new streamer would know it only once the stage registered it again,
and a stage that died before that - or while no streamer ran - would come back without its KV.

Written by the streamer on its event loop whenever the set of stage pools (or an owner) changes, before it
answers the request that changed it: a stage that got PoolRegistered is on record. Each write goes to a
temporary file in the same directory, then replaces the manifest (rename): a reader sees the old record or
the new one, never half of one. No fsync: the file lives beside the control socket (the supervisor's run
directory) and only has to outlive the process, not the host - a reboot takes /dev/shm with it anyway.

Read once, at start-up, before the streamer serves (streamer/service.py: StreamerService.start). Nothing in it
is trusted further than its shape: the whole file and each entry are decoded and validated on their own, so a
corrupt entry is skipped (logged) and the others are still adopted; what an entry names is checked as a
registration is (streamer/pools.py: PoolTable.adopt_stage_pool). JSON through msgspec; never pickle.

The owner's pid is recorded with its start time (/proc/<pid>/stat, field 22): a pid reused by another process
since is not mistaken for a live owner.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from streamer import wire

log = logging.getLogger(__name__)

VERSION = 1
MAX_BYTES = 4 << 20  # a manifest larger than this is not read (an entry is ~300 bytes)
MAX_POOLS = 4096


class PoolRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One shared-memory stage pool as the streamer mapped it."""

    name: str
    layout: wire.LayoutSpec
    path: str
    owner: str  # the registering client's identity
    incarnation: int  # the owner's incarnation when it registered (or took the pool over)
    pid: int  # the owner's process, 0 if unknown
    pid_start: int  # that process's start time in clock ticks after boot, 0 if unknown


class _Written(msgspec.Struct, frozen=True):
    version: int
    streamer: str
    pools: list[PoolRecord]


class _Read(msgspec.Struct, frozen=True):
    version: int
    streamer: str
    pools: list[msgspec.Raw]  # decoded one by one: one corrupt entry does not cost the others


def process_start(pid: int) -> int:
    """When process `pid` started (clock ticks after boot); 0 if it does not run (or is a zombie)."""
    if pid <= 0:
        return 0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return 0 if fields[0] == "Z" else int(fields[19])
    except (OSError, ValueError, IndexError):
        return 0


class PoolManifest:
    def __init__(self, path: str | Path, streamer: str) -> None:
        self.path, self.streamer = Path(path), streamer
        self._failed = False  # a write failed: said once, not at every change

    def save(self, records: list[PoolRecord]) -> None:
        """Replace the manifest with `records`, atomically. A failure is logged, never raised: the pools are
        registered either way, and only a later streamer's adoption misses them (those stages recompute)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(msgspec.json.encode(_Written(VERSION, self.streamer, records)))
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if not self._failed:
                log.warning("[stream] cannot write the pool manifest %s (%s): a restarted streamer will not adopt "
                            "these pools", self.path, e)
            self._failed = True
            return
        self._failed = False

    def load(self) -> list[PoolRecord]:
        """The well-formed entries of the manifest ([] when there is none); everything else is logged and
        skipped."""
        try:
            size = self.path.stat().st_size
            if size > MAX_BYTES:
                log.warning("[stream] pool manifest %s holds %d bytes (at most %d are read): ignored", self.path,
                            size, MAX_BYTES)
                return []
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            log.warning("[stream] cannot read the pool manifest %s (%s): ignored", self.path, e)
            return []
        try:
            got = msgspec.json.decode(data, type=_Read)
        except msgspec.DecodeError as e:  # ValidationError is a DecodeError
            log.warning("[stream] pool manifest %s is not a manifest (%s): ignored", self.path, e)
            return []
        if got.version != VERSION:
            log.warning("[stream] pool manifest %s has version %d, not %d: ignored", self.path, got.version, VERSION)
            return []
        if len(got.pools) > MAX_POOLS:
            log.warning("[stream] pool manifest %s lists %d pools: only the first %d are read", self.path,
                        len(got.pools), MAX_POOLS)
        out = []
        for i, raw in enumerate(got.pools[:MAX_POOLS]):
            try:
                out.append(msgspec.json.decode(raw, type=PoolRecord))
            except msgspec.DecodeError as e:
                log.warning("[stream] pool manifest %s: entry %d refused (%s)", self.path, i, e)
        return out

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
