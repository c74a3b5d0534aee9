"""Whether a stage swaps microbatches (`--swap auto|on|off`), and why: a pure function of figures, so the rule is
tested on its own (tests/stages/test_swap_policy.py) and the stage only measures the figures (stages/swap.py).

Runs in the stage process at start-up (before its KV pool is allocated: swapping makes that pool 2 microbatches
deep) and in the supervisor's checks. Torch-free: the supervisor imports it.

The paper's rule (section 4.2): swapping pays only while moving a microbatch's KV between host and device fits under
one step's compute; PCIe-bound (long sequences, large batches, a small model) it makes every step wait. And it only
pays when more microbatches are configured than the device holds at once - otherwise the pool holds them all.
"""

from __future__ import annotations

from dataclasses import dataclass

SWAP_MODES = ("auto", "on", "off")
RESIDENT_FRAMES = 2  # microbatches a swapping stage keeps in its own pool: the one computing and the next one


@dataclass(frozen=True)
class SwapDecision:
    on: bool
    reason: str
    mode: str = "off"  # what was asked: auto | on | off


def decide_swap(mode: str, microbatches: int, fit_resident: int | None, microbatch_kv_bytes: int,
                bandwidth_bps: float, step_s: float, *, frames: int = RESIDENT_FRAMES) -> SwapDecision:
    """mode: the flag. microbatches: configured in flight; fit_resident: how many microbatches' KV the device holds
    at once (None: all of them - a CPU stage, whose pool is host memory already). microbatch_kv_bytes: one
    microbatch's KV on this stage at the longest sequence (what a swap-in moves at worst); bandwidth_bps: host <->
    device copy bandwidth (CPU: memcpy); step_s: one decode step's compute on this stage (measured or predicted).
    `on` is the user's word (the supervisor refused what cannot work); `auto` turns it on only when it pays."""
    early = settled(mode, microbatches, fit_resident, frames=frames)
    if early is not None:
        return early
    if bandwidth_bps <= 0 or step_s <= 0:
        return SwapDecision(False, "auto: no bandwidth or step-time figure to predict a swap with", mode)
    swap_s = microbatch_kv_bytes / bandwidth_bps
    figures = (f"swap-in {swap_s * 1e3:.3g} ms ({microbatch_kv_bytes / 2**20:.4g} MiB at "
               f"{bandwidth_bps / 1e9:.3g} GB/s) vs step {step_s * 1e3:.3g} ms")
    if swap_s >= step_s:
        return SwapDecision(False, f"auto: swapping would be slower than compute: {figures}", mode)
    return SwapDecision(True, f"auto: {figures}; {microbatches} microbatches, {fit_resident} fit the device", mode)


def settled(mode: str, microbatches: int, fit_resident: int | None, *,
            frames: int = RESIDENT_FRAMES) -> SwapDecision | None:
    """The decision where no bandwidth or step figure is needed (the flag, too few microbatches, a CPU stage, all
    microbatches fitting the device), else None. The supervisor settles `auto` with it before any stage starts
    (recovery/sizing.py: size_with_swap, planned_swap), so a host's swap space is sized, and on GPU hosts pinned, only where swapping
    can run."""
    if mode not in SWAP_MODES:
        raise ValueError(f"--swap must be auto, on or off, got {mode!r}")
    if mode == "off":
        return SwapDecision(False, "--swap off", mode)
    if mode == "on":
        return SwapDecision(True, f"--swap on: {frames} of {microbatches} microbatches resident, the rest in the "
                                  "streamer's swap pool", mode)
    if microbatches <= frames:
        return SwapDecision(False, f"auto: {microbatches} microbatch(es) fit the {frames} resident frames: nothing "
                                   "to swap", mode)
    if fit_resident is None:
        return SwapDecision(False, "auto: a CPU stage's KV pool is host memory already: swapping frees nothing", mode)
    if fit_resident >= microbatches:
        return SwapDecision(False, f"auto: all {microbatches} microbatches fit in device memory ({fit_resident} "
                                   "would)", mode)
    return None


def check_swap_on(microbatches: int, *, streamer: bool, frames: int = RESIDENT_FRAMES) -> None:
    """`--swap on` that cannot work: a ValueError saying what to change. (With --prompt-stages only the token stages
    swap, their `microbatches`; prompts land in a receive pool by logical slot: stages/swap.py.)"""
    if not streamer:
        raise ValueError("--swap on needs the KV streamer (drop --no-streamer): the swapped-out microbatches' KV "
                         "lives in its swap pool")
    if microbatches <= frames:
        raise ValueError(f"--swap on needs more microbatches than the {frames} a stage keeps resident (give "
                         f"--microbatches {frames + 1} or more; {microbatches} now)")
