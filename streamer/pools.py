"""`PoolTable`: every pool the streamer knows, and the capacities its own pools draw on. Runs in the streamer
process, on its event loop (device work - opening CUDA IPC handles, pinning - is done by the caller on the GPU
thread and handed in).

Two families of pools:
- stage pools (POOL_STAGE) belong to a stage: registered by it, mapped here (shared memory or CUDA IPC);
- streamer pools (swap space, replica store, prompt receive slots: pinned host memory carved from one arena
  per kind; disk pools: one memory-mapped file each under disk_dir) belong to the streamer and survive the
  death of whoever asked for them - they are how a stage comes back. Each kind has an explicit capacity and an
  allocation that does not fit is refused with a CapacityError, never over-committed.
Disk pools also survive the streamer: their layout and committed fill marks sit next to the data in
`<file>.json`, so a restarted streamer given `exist_ok` picks them up.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import torch

from streamer import wire
from streamer.config import SHM_DIR, SHM_PREFIX, StreamerConfig
from streamer.endpoints import Endpoint
from streamer.errors import BadRequestError, CapacityError
from streamer.layout import PoolLayout
from streamer.memory import Arena, MappedFile
from streamer.regions import layout_from_spec, layout_to_spec

HOST_KINDS = {wire.POOL_SWAP: ("swap", "swap_bytes"), wire.POOL_REPLICA: ("replica", "replica_bytes"),
              wire.POOL_RECEIVE: ("receive", "receive_bytes")}
KIND_NAMES = {wire.POOL_STAGE: "stage", wire.POOL_DISK: "disk", **{k: v[0] for k, v in HOST_KINDS.items()}}


def _check_name(name: str) -> None:
    if not name or len(name) > 200 or any(ch in name for ch in "\0\n"):
        raise BadRequestError(f"pool names are 1-200 printable characters, got {name!r}")


def _spec_list(layout: PoolLayout) -> list[object]:
    spec = layout_to_spec(layout)
    return [getattr(spec, f) for f in spec.__struct_fields__]


class PoolTable:
    def __init__(self, config: StreamerConfig) -> None:
        self.config = config
        self.pools: dict[str, Endpoint] = {}
        self.arenas = {kind: Arena(label, getattr(config, setting), setting)
                       for kind, (label, setting) in HOST_KINDS.items()}
        self.disk_used = 0

    def get(self, name: str) -> Endpoint:
        ep = self.pools.get(name)
        if ep is None:
            raise BadRequestError(f"no pool named {name!r} here; known: {sorted(self.pools)}")
        return ep

    def _claim(self, name: str, replace: bool) -> None:
        _check_name(name)
        if name in self.pools and not replace:
            raise BadRequestError(f"pool {name!r} already exists (a restarted stage registers with replace=True)")

    # ------------------------------------------------------------------ stage pools

    def add_stage_pool(self, name: str, layout: PoolLayout, flat: torch.Tensor, owner: str,
                       release: list[Callable[[], None]], events: list[torch.cuda.Event] | None = None,
                       path: str = "") -> Endpoint:
        """Install a mapped stage pool (the caller removed any pool it replaces first)."""
        ep = Endpoint(name, wire.POOL_STAGE, layout, flat, owner, release, events, path)
        self.pools[name] = ep
        return ep

    def adopt_stage_pool(self, name: str, spec: wire.LayoutSpec, path: str, owner: str) -> Endpoint:
        """Map a shared-memory stage pool a previous streamer recorded (streamer/manifest.py), as a registration
        would: a valid name not taken yet, a valid layout, a KV segment in /dev/shm that still exists and holds
        exactly the layout's bytes, and a file no other pool maps (one name, one owner that unlinks it).
        Anything else raises BadRequestError and leaves the file alone."""
        self._claim(name, replace=False)
        layout = layout_from_spec(spec)
        if layout.row_bytes > self.config.staging_bytes:
            raise BadRequestError(f"a {layout.row_bytes}-byte KV row exceeds staging_bytes={self.config.staging_bytes}")
        taken = next((p.name for p in self.pools.values() if p.path == path), None)
        if taken is not None:
            raise BadRequestError(f"{path} is mapped as pool {taken!r} already")
        try:
            flat, release = self.map_shm(path, layout)
        except OSError as e:  # not a file we may open (FileNotFoundError is a BadRequestError already)
            raise BadRequestError(f"cannot map {path}: {e}") from None
        return self.add_stage_pool(name, layout, flat, owner, release, path=path)

    @staticmethod
    def map_shm(path: str, layout: PoolLayout) -> tuple[torch.Tensor, list[Callable[[], None]]]:
        """Map a stage's shared-memory pool; from now on this process owns (and will unlink) its name."""
        p = Path(path)
        # the streamer will unlink this name one day: only ever a KV segment in shared memory, never any file
        if p.parent != SHM_DIR or not p.name.startswith(SHM_PREFIX) or ".." in p.parts:
            raise BadRequestError(f"shared-memory pools live at {SHM_DIR}/{SHM_PREFIX}*, got {path!r}")
        try:
            mf = MappedFile(p, layout.nbytes, create=False)
        except FileNotFoundError:
            raise BadRequestError(f"shared-memory pool file {path} does not exist") from None
        return mf.tensor, [mf.unlink]

    # ------------------------------------------------------------------ streamer pools

    def alloc(self, name: str, kind: int, spec: wire.LayoutSpec, owner: str, exist_ok: bool) -> tuple[Endpoint, bool]:
        _check_name(name)
        layout = layout_from_spec(spec)
        if layout.row_bytes > self.config.staging_bytes:
            raise BadRequestError(f"a {layout.row_bytes}-byte KV row exceeds staging_bytes={self.config.staging_bytes}")
        old = self.pools.get(name)
        if old is not None:
            if exist_ok and old.kind == kind and layout_to_spec(old.layout) == spec:
                return old, True
            raise BadRequestError(f"pool {name!r} already exists as a {KIND_NAMES.get(old.kind)} pool "
                                  f"{'with another layout' if old.kind == kind else ''}".rstrip())
        if kind in HOST_KINDS:
            return self._alloc_host(name, kind, layout, owner), False
        if kind == wire.POOL_DISK:
            return self._alloc_disk(name, layout, owner, exist_ok)
        raise BadRequestError(f"cannot allocate pools of kind {kind} (stage pools are registered by their stage)")

    def _alloc_host(self, name: str, kind: int, layout: PoolLayout, owner: str) -> Endpoint:
        arena = self.arenas[kind]
        got = arena.allocate(layout.nbytes, f"pool {name!r}")
        ep = Endpoint(name, kind, layout, arena.view(got, layout.nbytes), owner, [lambda: arena.release(got)])
        self.pools[name] = ep
        return ep

    def _disk_path(self, name: str) -> Path:
        if not self.config.disk_dir:
            raise CapacityError("no disk pools on this streamer (set disk_dir and disk_bytes)")
        return Path(self.config.disk_dir) / (urllib.parse.quote(name, safe="") + ".kv")

    def _alloc_disk(self, name: str, layout: PoolLayout, owner: str, exist_ok: bool) -> tuple[Endpoint, bool]:
        path = self._disk_path(name)
        existed = exist_ok and path.exists()
        if self.disk_used + layout.nbytes > self.config.disk_bytes:
            raise CapacityError(f"disk capacity exhausted: pool {name!r} needs {layout.nbytes} bytes; "
                                f"{self.config.disk_bytes - self.disk_used} of {self.config.disk_bytes} are free. "
                                f"Free pools or raise disk_bytes")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not exist_ok:
            raise BadRequestError(f"disk pool file {path} exists (allocate with exist_ok to adopt it)")
        mf = MappedFile(path, layout.nbytes, create=not existed)
        meta = path.with_suffix(".json")
        size = layout.nbytes

        def release() -> None:
            self.disk_used -= size

        ep = Endpoint(name, wire.POOL_DISK, layout, mf.tensor, owner, [release], path=str(path))
        ep.disk = (mf, meta)  # type: ignore[attr-defined]
        if existed and meta.exists():
            saved = json.loads(meta.read_text())
            if saved.get("layout") != _spec_list(layout):
                raise BadRequestError(f"disk pool {path} was written with layout {saved.get('layout')}, "
                                      f"not {_spec_list(layout)}")
            ep.filled = [int(x) for x in saved.get("filled", ep.filled)][: layout.num_slots]
        self.disk_used += size
        self.pools[name] = ep
        self.save_disk_meta(ep)
        return ep, existed

    @staticmethod
    def save_disk_meta(ep: Endpoint) -> None:
        """Flush a disk pool's data, then atomically replace its metadata (layout + committed fill marks)."""
        disk = getattr(ep, "disk", None)
        if disk is None:
            return
        mf, meta = disk
        mf.flush()
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"layout": _spec_list(ep.layout), "filled": ep.filled}))
        os.replace(tmp, meta)

    def remove(self, name: str) -> Endpoint:
        ep = self.get(name)
        del self.pools[name]
        return ep

    @staticmethod
    def delete_disk_files(ep: Endpoint) -> None:
        disk = getattr(ep, "disk", None)
        if disk is not None:
            mf, meta = disk
            mf.unlink()
            meta.unlink(missing_ok=True)

    def free_bytes(self, kind: int) -> int:
        if kind == wire.POOL_DISK:
            return self.config.disk_bytes - self.disk_used
        return self.arenas[kind].free_bytes if kind in self.arenas else 0

    def capacity(self) -> list[wire.CapacityInfo]:
        out = [wire.CapacityInfo(k, a.capacity, a.used) for k, a in self.arenas.items()]
        out.append(wire.CapacityInfo(wire.POOL_DISK, self.config.disk_bytes, self.disk_used))
        return out
