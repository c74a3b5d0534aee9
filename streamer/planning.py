"""Turning a StreamRequest into a Transfer: validate the source, the routes and every destination, build the
row maps and chunk plans. Pure (no I/O): called by StreamerService on the event loop; every problem is a
BadRequestError raised before anything moves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from streamer import wire
from streamer.config import StreamerConfig
from streamer.engine import LocalRoute, RemoteRoute, Runtime, Transfer, local_route
from streamer.errors import BadRequestError
from streamer.layout import Region
from streamer.movers import RouteIndex
from streamer.pools import PoolTable
from streamer.regions import check_region, region_from_spec


def transfer_options(config: StreamerConfig, msg: wire.StreamRequest) -> tuple[bool | None, bool, float]:
    """(checksum, buffered, deadline_s): the request's, or the streamer's defaults. checksum None: decided per
    route by the "remote" policy (engine.Transfer.checks)."""
    check = msg.checksum if msg.checksum is not None else {"all": True, "off": False}.get(config.checksums)
    buffered = config.buffered if msg.buffered is None else msg.buffered
    deadline = msg.deadline_s if msg.deadline_s > 0 else config.transfer_timeout_s
    return check, buffered, deadline


def overlaps(a: Region, b: Region) -> bool:
    if a.layers[1] <= b.layers[0] or b.layers[1] <= a.layers[0]:
        return False
    bt = dict(zip(b.slots, b.tokens))
    return any(s in bt and t0 < bt[s][1] and bt[s][0] < t1 for s, (t0, t1) in zip(a.slots, a.tokens))


def plan_transfer(rt: Runtime, pools: PoolTable, owner: str, msg: wire.StreamRequest,
                  on_layer: Callable[[int, int, int], Awaitable[None]] | None) -> Transfer:
    config = rt.config
    src = pools.get(msg.src.pool)
    region = region_from_spec(msg.region)
    check_region(src.layout, region, f"source region of pool {src.name!r}")
    if not msg.routes:
        raise BadRequestError("a transfer needs at least one route")
    check, buffered, deadline = transfer_options(config, msg)
    routes: list[LocalRoute | RemoteRoute] = []
    covered: set[int] = set()
    for r in msg.routes:
        a, b = (list(r.src_layers) + [0, 0])[:2]
        if not region.layers[0] <= a < b <= region.layers[1] or covered & set(range(a, b)):
            raise BadRequestError(f"route layers [{a}, {b}) must lie inside the region's {region.layers} "
                                  "and not overlap another route's")
        covered |= set(range(a, b))
        sub = region.sub_layers(a, b)
        dst_region = region_from_spec(r.region)
        if r.dst.streamer in ("", config.name):
            dst = pools.get(r.dst.pool)
            if dst is src and overlaps(sub, dst_region):
                raise BadRequestError("source and destination regions overlap inside one pool")
            routes.append(local_route(src, sub, dst, dst_region, config.staging_bytes, msg.layered))
            continue
        # the peer validates its pool; the shape can be checked here, before anything is sent
        if [t1 - t0 for t0, t1 in sub.tokens] != [t1 - t0 for t0, t1 in dst_region.tokens] \
                or sub.num_layers != dst_region.num_layers:
            raise BadRequestError("route's destination region differs in shape from its source layers")
        rt.peers.link(r.dst.streamer)  # an unknown peer fails now, not mid-transfer
        routes.append(RemoteRoute(sub, r.dst.streamer, r.dst.pool, dst_region,
                                  RouteIndex.build(src, sub, None, dst_region),  # row maps on first use
                                  None))  # chunks: planned for the path the transfer takes (engine._remote)
    t = Transfer(rt, owner, msg.xfer, msg.tag, src, routes, layered=msg.layered, checksum=check,
                 buffered=buffered, deadline_s=deadline, notify=list(msg.notify), on_layer=on_layer)
    if msg.timeline:
        t.times = {}
    return t
