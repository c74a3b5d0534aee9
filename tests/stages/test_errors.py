"""Bad input gives a typed error with a clear message: through `generate`, through the CLI's `main` (exit
code 2, one line on stderr, no traceback), and once through the real `bin/dejavu-generate` process."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stages.batch import SeqChunk
from stages.errors import CapacityError, InvalidRequestError
from stages.generate import GenerationRequest, LocalPipeline, generate
from stages.generate_cli import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bin" / "dejavu-generate"
MAX_SEQ = 16
VOCAB = 211  # tiny llama


@pytest.fixture(scope="module")
def pipe(model_factory) -> LocalPipeline:  # type: ignore[no-untyped-def]
    return LocalPipeline(model_factory("llama"), 2, num_slots=2, max_seq_len=MAX_SEQ)


@pytest.mark.parametrize(
    "prompt,new,message",
    [
        ([3, VOCAB], 4, rf"\[{VOCAB}\] outside the vocabulary \[0, {VOCAB}\)"),
        ([3, 10**12], 4, "outside the vocabulary"),
        ([-1, 4], 4, r"\[-1\] outside the vocabulary"),
        ([3, 4.0], 4, "outside the vocabulary"),  # not an int
        ([], 4, "empty prompt"),
        ([5] * MAX_SEQ, 1, f"prompt of {MAX_SEQ} tokens leaves no room.*maximum sequence length is {MAX_SEQ}"),
        ([5] * (MAX_SEQ + 7), 1, "leaves no room"),
        ([5, 6], 0, "max_new_tokens must be >= 1, got 0"),
        ([5, 6], -3, "max_new_tokens must be >= 1"),
    ],
)
def test_generate_rejects_bad_requests(pipe: LocalPipeline, prompt: list[int], new: int, message: str) -> None:
    good = GenerationRequest([3, 4, 5], 2)
    with pytest.raises(InvalidRequestError, match=message):
        generate(pipe, [good, GenerationRequest(prompt, new)])  # type: ignore[arg-type]
    # nothing was half-done: the pipeline still serves
    assert len(generate(pipe, [good])[0].token_ids) == 2


def test_longest_prompt_that_fits(pipe: LocalPipeline) -> None:
    [res] = generate(pipe, [GenerationRequest([5] * (MAX_SEQ - 1), 10)])
    assert len(res.token_ids) == 1 and res.finish_reason == "length"


def test_more_requests_than_slots(pipe: LocalPipeline) -> None:
    with pytest.raises(CapacityError, match="3 requests but only 2 KV slots"):
        generate(pipe, [GenerationRequest([3], 1)] * 3)


def test_bad_token_in_a_raw_step(pipe: LocalPipeline) -> None:
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        pipe.step([SeqChunk(0, 0, 2)], [3, VOCAB + 1])


def test_max_seq_len_past_the_models_positions(model_factory) -> None:  # type: ignore[no-untyped-def]
    """OPT has learned positions (128 in the tiny model): a longer KV slot is refused up front."""
    with pytest.raises(InvalidRequestError, match="exceeds the model's 128 positions"):
        LocalPipeline(model_factory("opt"), 1, num_slots=1, max_seq_len=129)


def test_unknown_cudnn_attention_mode_is_refused(model_factory) -> None:  # type: ignore[no-untyped-def]
    from stages.layers.attention import set_cudnn_attention
    from stages.runtime import ShardConfig

    with pytest.raises(ValueError, match="cudnn_attention must be one of all, decode, off"):
        ShardConfig(model_factory("llama"), cudnn_attention="sometimes")
    with pytest.raises(ValueError, match="cudnn_attention"):
        set_cudnn_attention("yes")


# --- the CLI --------------------------------------------------------------------------------------------------


def _unknown_arch_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw["architectures"] = ["FalconForCausalLM"]
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt-ids", f"3,{VOCAB}"], "outside the vocabulary"),
        (["--prompt-ids=-1,4"], r"\[-1\] outside the vocabulary"),
        (["--prompt-ids", "3", "--prompt-ids="], "empty prompt"),
        (["--prompt-ids", "3,4,5,6,7", "--max-seq-len", "5"], "prompt of 5 tokens leaves no room"),
        (["--prompt-ids", "3,4", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--prompt-ids", "3", "--temperature", "-1"], "temperature must be"),
        (["--prompt-ids", "3", "--top-p", "0"], "top_p must be"),
        (["--prompt-ids", "3", "--stages", "5"], "cannot split 4 layers into 5 stages"),
        (["--prompt", "hello"], "has no tokenizer: use --prompt-ids"),
        (["--prompt-ids", "3", "--device", "cuda"], "no CUDA GPU"),
    ],
)
def test_cli_bad_input_exits_2(args: list[str], message: str, model_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = main(["--model", str(model_factory("llama")), "--max-new-tokens", "3", *args])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.startswith("dejavu-generate: error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_cli_bad_model_dirs_exit_2(model_factory, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cases = [
        (tmp_path / "does-not-exist", "no config.json"),
        (_unknown_arch_dir(model_factory("llama"), tmp_path / "falcon"), "'FalconForCausalLM' is not supported"),
    ]
    for path, message in cases:
        rc = main(["--model", str(path), "--prompt-ids", "3"])
        _, err = capsys.readouterr()
        assert rc == 2 and message in err and "Traceback" not in err


def test_cli_usage_errors_exit_2(model_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    for args in ([], ["--prompt-ids", "3,x"], ["--prompt-ids", "3", "--dtype", "float64"]):
        with pytest.raises(SystemExit) as info:
            main(["--model", str(model_factory("llama")), *args])
        assert info.value.code == 2
        assert "usage: dejavu-generate" in capsys.readouterr().err


def test_script_reports_errors_without_traceback(model_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The real executable, from another working directory, with no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model_factory("llama")), "--prompt-ids", "3,4",
         "--prompt-ids", f"5,{VOCAB + 3}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert f"dejavu-generate: error: prompt token id(s) [{VOCAB + 3}] outside the vocabulary" in proc.stderr
    assert "Traceback" not in proc.stderr
