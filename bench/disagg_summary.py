"""`dejavu-bench disagg`'s verdict: colocated against each prompt/token split, from their measured rate sweeps.

- per rate: each split's tokens/s and p50 normalized latency over the colocated pipeline's at that rate (at a
  rate every setting keeps up with, tokens/s is the offered load for all of them: the ratio is ~1 there);
- at equal normalized latency (the issue's "throughput at equal normalized latency"): each setting's curve of p50
  normalized latency against rate is cut at one bound, linearly between the two measured rates around the
  crossing, which gives the rate and tokens/s it sustains within the bound; a curve that never crosses gives its
  highest measured rate, flagged as a lower bound; one already over it at the lowest rate gives none;
- the best split measured (by tokens/s at that bound, then by tokens/s at the highest rate), the planner's pick
  against it (the target: within 10%), and the best split's ratio to colocated (the target: 1.8x or more).
Pure: run records in, a dict out (bench/disagg_bench.py makes the records; tests feed made-up ones).
"""

from __future__ import annotations

from typing import Any

BOUND_FACTOR = 2.0  # the default bound: this x the highest p50 normalized latency of any setting at its lowest rate
PLANNER_MARGIN = 0.10
TARGET_RATIO = 1.8

METHOD = ("interpolated: each setting's p50 normalized latency against request rate is cut at bound_s, linearly "
          "between the last measured rate under the bound and the first over it; tokens/s likewise. A curve that "
          "never crosses gives its highest measured rate (lower_bound: true); one over the bound at its lowest "
          "rate gives none")


def _points(rates: list[dict[str, Any]]) -> list[tuple[float, float | None, float | None]]:
    """(rate, p50 normalized latency, tokens/s) by rate; a rate where nothing completed has no latency."""
    return sorted((r["rate"], r["normalized_latency_s"]["p50"], r["tokens_per_s"]) for r in rates)


def default_bound(runs: list[dict[str, Any]]) -> float | None:
    """BOUND_FACTOR x the highest p50 normalized latency any setting measured at its lowest rate: every curve starts
    under it (the lowest rate should be one every setting keeps up with), and it means "twice as slow per token
    as the slowest setting unloaded"."""
    lows = [p[0][1] for p in (_points(r["rates"]) for r in runs) if p and p[0][1] is not None]
    return BOUND_FACTOR * max(lows) if lows else None


def at_latency(rates: list[dict[str, Any]], bound: float) -> dict[str, Any]:
    """The rate and tokens/s one setting sustains with its p50 normalized latency at `bound` (see METHOD)."""
    prev: tuple[float, float, float] | None = None
    for rate, nl, tps in _points(rates):
        if nl is None or tps is None or nl > bound:
            if prev is None:
                return {"rate": None, "tokens_per_s": None, "lower_bound": False,
                        "note": f"over the bound already at its lowest rate ({rate:g} req/s)"}
            if nl is None or tps is None:  # nothing completed there: the crossing is at the last good rate
                return {"rate": prev[0], "tokens_per_s": prev[2], "lower_bound": True}
            f = (bound - prev[1]) / (nl - prev[1])
            return {"rate": prev[0] + f * (rate - prev[0]), "tokens_per_s": prev[2] + f * (tps - prev[2]),
                    "lower_bound": False, "between_rates": [prev[0], rate]}
        prev = (rate, nl, tps)
    if prev is None:
        return {"rate": None, "tokens_per_s": None, "lower_bound": False, "note": "no rate measured"}
    return {"rate": prev[0], "tokens_per_s": prev[2], "lower_bound": True}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def by_rate(colocated: dict[str, Any], splits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for c in colocated["rates"]:
        row: dict[str, Any] = {"rate": c["rate"], "colocated_tokens_per_s": c["tokens_per_s"],
                               "colocated_normalized_latency_p50_s": c["normalized_latency_s"]["p50"], "splits": {}}
        for run in splits:
            r = next((r for r in run["rates"] if r["rate"] == c["rate"]), None)
            if r is not None:
                row["splits"][run["name"]] = {
                    "tokens_per_s": r["tokens_per_s"], "tokens_per_s_ratio": _ratio(r["tokens_per_s"], c["tokens_per_s"]),
                    "normalized_latency_p50_s": r["normalized_latency_s"]["p50"],
                    "normalized_latency_p50_ratio": _ratio(r["normalized_latency_s"]["p50"],
                                                           c["normalized_latency_s"]["p50"])}
        out.append(row)
    return out


def _rank(run: dict[str, Any], at: dict[str, Any]) -> tuple[float, float]:
    top = max(run["rates"], key=lambda r: r["rate"])["tokens_per_s"] if run["rates"] else None
    return (at["tokens_per_s"] or 0.0, top or 0.0)


def summarize(runs: list[dict[str, Any]], pick: str | None, bound: float | None = None) -> dict[str, Any]:
    """`runs`: the colocated run and the splits' (each with `name`, `mode` and `rates`); `pick`: the planner's split
    by name; `bound`: seconds per token (None: default_bound)."""
    colocated = next((r for r in runs if r["mode"] == "colocated"), None)
    splits = [r for r in runs if r["mode"] == "disaggregated"]
    source = "--latency-bound" if bound is not None else f"{BOUND_FACTOR:g}x the highest p50 normalized latency " \
                                                         "of any setting at its lowest rate"
    bound = bound if bound is not None else default_bound(runs)
    out: dict[str, Any] = {"by_rate": by_rate(colocated, splits) if colocated is not None else []}
    if bound is None:
        out["equal_latency"] = {"method": METHOD, "bound_s": None, "note": "no latency measured"}
        return out
    at = {r["name"]: at_latency(r["rates"], bound) for r in runs}
    base = at[colocated["name"]]["tokens_per_s"] if colocated is not None else None
    for r in splits:
        at[r["name"]]["tokens_per_s_ratio_to_colocated"] = _ratio(at[r["name"]]["tokens_per_s"], base)
    out["equal_latency"] = {"method": METHOD, "bound_s": bound, "bound_from": source, "settings": at}
    if not splits:
        return out
    ranks = {r["name"]: _rank(r, at[r["name"]]) for r in splits}
    best = max(splits, key=lambda r: ranks[r["name"]])["name"]
    by = "tokens/s at equal normalized latency" if ranks[best][0] > 0 else "tokens/s at the highest rate"
    key = 0 if ranks[best][0] > 0 else 1
    out["best_split"] = {"name": best, "by": by, "value": ranks[best][key]}
    if pick is not None and pick in ranks:
        share = ranks[pick][key] / ranks[best][key] if ranks[best][key] > 0 else None
        out["planner"] = {"pick": pick, "value": ranks[pick][key], "over_best": share,
                          "within_10pct": share is not None and share >= 1 - PLANNER_MARGIN}
    else:
        out["planner"] = {"pick": pick, "within_10pct": None, "note": "the planner's pick was not measured"}
    ratio = at[best].get("tokens_per_s_ratio_to_colocated")
    out["target"] = {"ratio": TARGET_RATIO, "best_split_ratio_at_equal_latency": ratio,
                     "met": ratio is not None and ratio >= TARGET_RATIO}
    return out
