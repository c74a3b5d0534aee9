"""`dejavu-bench curve`: the control-message rate, plaintext vs CURVE, through the deployment's socket pieces."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import curve_bench
from bus import security
from bus.sockets import recv_frames, send


def test_both_modes_measure_positive_rates_and_latencies() -> None:
    report = curve_bench.measure(seconds=0.3, rounds=2)
    rows = report["messages"]
    assert set(rows) == set(curve_bench.MESSAGES)
    assert rows["step_result"]["envelope_bytes"] > rows["heartbeat"]["envelope_bytes"] > 0
    for row in rows.values():
        for mode in curve_bench.MODES:
            pp, st = row["ping_pong"][mode], row["stream"][mode]
            assert pp["round_trips_per_s"] > 0 and pp["latency_p50_us"] > 0 and pp["cpu_us_per_round_trip"] > 0
            assert st["messages_per_s"] > 0 and st["cpu_us_per_message"] > 0
            assert pp["rounds"] == st["rounds"] == 2
        ratios = [*row["ping_pong"]["curve_over_plaintext"].values(), *row["stream"]["curve_over_plaintext"].values()]
        assert len(ratios) == 5 and all(r > 0 for r in ratios)
    assert report["wall_s"] < 20
    # no time at all still measures one round trip and one burst per figure (no division by zero)
    zero = curve_bench.measure(seconds=0.0, rounds=1)["messages"]["heartbeat"]
    assert zero["ping_pong"]["curve"]["round_trips_per_s"] > 0 and zero["stream"]["curve"]["messages_per_s"] > 0


def test_the_curve_pair_is_authenticated_and_the_plaintext_pair_is_not(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The CURVE pair really runs CURVE: the ROUTER's frames carry the DEALER's authenticated name (ZAP's
    User-Id), which a plaintext connection has none of."""
    keys = str(tmp_path / "keys")
    security.generate(keys, [curve_bench.SERVER, curve_bench.CLIENT])

    async def peer(keys_dir: str | None) -> str | None:
        pair = curve_bench.Pair(keys_dir)
        try:
            await send(pair.dealer, pair.client_codec, curve_bench.MESSAGES["heartbeat"])
            frames = await asyncio.wait_for(recv_frames(pair.router), 10)
            return security.peer_of_frame(frames[1])
        finally:
            pair.close()

    assert asyncio.run(peer(keys)) == curve_bench.CLIENT
    assert asyncio.run(peer(None)) is None


def test_the_sub_command_writes_its_json_and_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    assert curve_bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "curve_bench.json").read_text())
    assert result["command"].startswith("bin/dejavu-bench curve") and result["machine"]["cpus"] > 0
    assert result["commit"] is None or len(result["commit"]) >= 7
    assert result["messages"]["heartbeat"]["stream"]["curve"]["messages_per_s"] > 0
    assert (tmp_path / "curve_bench.png").stat().st_size > 1000
