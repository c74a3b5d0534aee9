"""`python -m streamer`: parse arguments into a StreamerConfig and run the streamer process.

    python -m streamer --name host0 --control tcp://127.0.0.1:5600 --data tcp://0.0.0.0:5601 \
        --swap-gib 64 --replica-gib 32 --receive-gib 8 --peer host1=tcp://10.0.0.2:5601
"""

from __future__ import annotations

import argparse
import sys

from streamer.config import CHECKSUM_POLICIES, MiB, StreamerConfig
from streamer.proc import run_streamer

GiB = 1 << 30


def parse_args(argv: list[str] | None = None) -> StreamerConfig:
    p = argparse.ArgumentParser(prog="python -m streamer", description="DéjàVu KV streamer (one per host)")
    p.add_argument("--name", required=True, help="this streamer's name (peers address it by this)")
    p.add_argument("--control", required=True, help="control ROUTER endpoint, e.g. ipc:///run/dejavu/streamer")
    p.add_argument("--data", required=True, help="data ROUTER endpoint for peer streamers")
    p.add_argument("--incarnation", type=int, default=0)
    p.add_argument("--swap-gib", type=float, default=0.0, help="pinned swap space")
    p.add_argument("--replica-gib", type=float, default=0.0, help="pinned replica store")
    p.add_argument("--receive-gib", type=float, default=0.0, help="pinned prompt receive slots")
    p.add_argument("--disk-dir", default="")
    p.add_argument("--disk-gib", type=float, default=0.0)
    p.add_argument("--manifest", default="",
                   help="file recording the shared-memory stage pools this streamer maps; a streamer restarted with "
                        "the same file adopts those that still exist (default: none)")
    p.add_argument("--no-pin", action="store_true", help="do not page-lock host pools")
    p.add_argument("--naive", action="store_true", help="default to one copy per contiguous piece (ablation)")
    p.add_argument("--checksums", choices=CHECKSUM_POLICIES, default="remote",
                   help="default for transfers that do not say: verify where bytes pass through software (remote "
                        "frames, NCCL, disk pools; the default), every transfer, or none")
    p.add_argument("--no-checksums", action="store_true", help="the same as --checksums off")
    p.add_argument("--no-nccl", action="store_true")
    p.add_argument("--staging-mib", type=float, default=16.0)
    p.add_argument("--lanes", type=int, default=3)
    p.add_argument("--tcp-chunk-mib", type=float, default=8.0)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--copy-threads", type=int, default=1, help="torch threads for CPU copies")
    p.add_argument("--frame-threads", type=int, default=4,
                   help="threads gathering and scattering frames to and from peer streamers (chunks in parallel)")
    p.add_argument("--switch-interval-us", type=float, default=200.0,
                   help="the process's interpreter-lock switch interval (Python's default: 5000)")
    p.add_argument("--transfer-timeout", type=float, default=60.0)
    p.add_argument("--peer-timeout", type=float, default=3.0)
    p.add_argument("--layer-timeout", type=float, default=30.0)
    p.add_argument("--layer-wait", choices=["device", "host"], default="host",
                   help="layered transfers from a GPU stage wait for each layer on a host thread (default) or on the GPU")
    p.add_argument("--inline-dma", action=argparse.BooleanOptionalAction, default=True,
                   help="enqueue DMA-only copies on the event loop's thread (default); --no-inline-dma: every copy "
                        "on the GPU thread")
    p.add_argument("--completion-spin-us", type=float, default=1000.0,
                   help="poll a local copy's completion from the event loop for up to this long when the copy should "
                        "take at most a quarter of it (0: always wait on a waiter thread)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=ADDRESS")
    p.add_argument("--supervisor", default="", help="supervisor endpoint (Hello + heartbeats)")
    a = p.parse_args(argv)
    peers = []
    for item in a.peer:
        name, sep, addr = item.partition("=")
        if not sep:
            p.error(f"--peer wants NAME=ADDRESS, got {item!r}")
        peers.append((name, addr))
    try:
        return StreamerConfig(
            name=a.name, control_address=a.control, data_address=a.data, incarnation=a.incarnation,
            swap_bytes=int(a.swap_gib * GiB), replica_bytes=int(a.replica_gib * GiB),
            receive_bytes=int(a.receive_gib * GiB), disk_dir=a.disk_dir, disk_bytes=int(a.disk_gib * GiB),
            manifest=a.manifest,
            pin_memory=not a.no_pin, buffered=not a.naive, checksums="off" if a.no_checksums else a.checksums, nccl=not a.no_nccl,
            staging_bytes=int(a.staging_mib * MiB), staging_lanes=a.lanes, tcp_chunk_bytes=int(a.tcp_chunk_mib * MiB),
            window=a.window, copy_threads=a.copy_threads, frame_threads=a.frame_threads,
            switch_interval_us=a.switch_interval_us, transfer_timeout_s=a.transfer_timeout, peer_timeout_s=a.peer_timeout,
            layer_timeout_s=a.layer_timeout, layer_wait=a.layer_wait, inline_dma=a.inline_dma,
            completion_spin_us=a.completion_spin_us, peers=tuple(peers),
            supervisor_address=a.supervisor)
    except ValueError as e:
        p.error(str(e))
        raise  # unreachable: p.error exits


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 1 and args[0].startswith("{"):  # started by the supervisor: a StreamerConfig as JSON
        from bus.child import decode_config, setup_child

        config = decode_config(StreamerConfig, args[0])
        setup_child(f"dejavu: streamer {config.name}", config.log_level, config.supervisor_pid)
        return run_streamer(config)
    return run_streamer(parse_args(args))


if __name__ == "__main__":
    sys.exit(main())
