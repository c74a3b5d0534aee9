"""Telling this host's streamer where the other hosts' streamers are (their data addresses), once per address.

Shared by a stage's replication (stages/replica.py) and its prompt-to-token KV streaming (stages/kv_push.py):
both push to pools that other hosts' streamers hold. A restarted streamer knows no peers: the owner clears
`known` when its client reconnects, and the next epoch's Topology tells them again.
"""

from __future__ import annotations

import logging

from streamer.client import StreamerClient
from streamer.errors import StreamerError

log = logging.getLogger(__name__)


async def tell_peers(client: StreamerClient, own: str, peers: dict[str, str], known: dict[str, str]) -> None:
    """Set every peer of `peers` (streamer name -> data address) that `known` does not hold yet. A streamer that
    does not answer (restarting) is logged; the transfers that need the peer then fail and say so."""
    for name, address in peers.items():
        if name != own and known.get(name) != address:
            try:
                await client.set_peer(name, address)
                known[name] = address
            except StreamerError as e:
                log.warning("[stream] could not tell the streamer where %s is: %s", name, e)
