"""`--swap auto|on|off` (issue 20): auto turns swapping on only where a swap-in fits under a decode step and more
microbatches are configured than the device holds; `on` that cannot work is refused with what to change."""

from __future__ import annotations

import pytest

from recovery.serve_cli import main as serve
from recovery.specs import DeploymentConfig
from stages.swap_policy import decide_swap

GB = 1e9
MB_KV = 2 << 30  # one microbatch's KV on a stage: 2 GiB


def test_auto_is_off_where_swapping_would_be_slower_than_compute() -> None:
    # PCIe-bound: 2 GiB at 25 GB/s = 86 ms per swap-in against a 20 ms step
    d = decide_swap("auto", 8, 3, MB_KV, 25 * GB, 0.020)
    assert not d.on and "slower than compute" in d.reason and "vs step 20 ms" in d.reason, d


def test_auto_is_on_where_a_swap_in_fits_under_a_step() -> None:
    # 2 GiB at 50 GB/s = 43 ms per swap-in under a 60 ms step; 8 microbatches, the GPU holds 3
    d = decide_swap("auto", 8, 3, MB_KV, 50 * GB, 0.060)
    assert d.on and d.mode == "auto" and "swap-in 42.9 ms" in d.reason and "3 fit the device" in d.reason, d


@pytest.mark.parametrize("microbatches,fit,why", [
    (2, 1, "fit the 2 resident frames"),  # nothing to swap
    (8, 8, "all 8 microbatches fit in device memory"),  # the device holds them all
    (8, None, "CPU stage's KV pool is host memory already"),  # a CPU stage: swapping frees nothing
])
def test_auto_is_off_where_swapping_frees_nothing(microbatches: int, fit: int | None, why: str) -> None:
    d = decide_swap("auto", microbatches, fit, MB_KV, 50 * GB, 1.0)
    assert not d.on and why in d.reason, d


def test_on_and_off_are_the_users_word() -> None:
    assert decide_swap("on", 6, None, MB_KV, 0.0, 0.0).on
    assert not decide_swap("off", 6, 1, MB_KV, 50 * GB, 1.0).on
    with pytest.raises(ValueError, match="auto, on or off"):
        decide_swap("sometimes", 6, 1, MB_KV, 50 * GB, 1.0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_microbatches=2), "needs more microbatches than the 2 a stage keeps resident"),
    (dict(num_stages=1), "--microbatches 3 or more; 1 now"),  # default: one microbatch per stage
    (dict(num_microbatches=6, streamer=False), "needs the KV streamer"),
    # disaggregated: the token pipeline's microbatches count (one per token stage by default)
    (dict(num_stages=2, prompt_stages=1, token_stages=1), "--microbatches 3 or more; 1 now"),
])
def test_swap_on_that_cannot_work_is_refused(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        DeploymentConfig("model", swap="on", **kwargs)
    assert DeploymentConfig("model", swap="auto", **kwargs).swap == "auto"  # auto simply decides off


def test_dejavu_serve_says_what_to_change(model_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    assert serve(["--model", str(model_factory("llama")), "--swap", "on", "--stages", "2"]) == 2
    err = capsys.readouterr().err
    assert "dejavu-serve: error: --swap on needs more microbatches than the 2 a stage keeps resident" in err


def test_swapping_is_for_the_token_stages_with_disaggregation() -> None:
    """With --prompt-stages the token stages swap (prompts land in their receive pools by logical slot); a prompt
    stage never does (its KV lives for one pass); auto decides there by the same rule as colocated."""
    on = DeploymentConfig("model", swap="on", num_microbatches=6, num_stages=2, prompt_stages=1, token_stages=1)
    assert on.swap_mode == "on" and on.microbatches == 6
    assert DeploymentConfig("model", prompt_stages=1, token_stages=2, num_stages=3).swap_mode == "auto"
    d = decide_swap("auto", 8, 3, MB_KV, 50 * GB, 0.060)
    assert d.on and "not with --prompt-stages" not in d.reason
