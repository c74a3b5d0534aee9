"""`bin/dejavu-generate` and the embedded default model: the script runs from a checkout and prints one JSON
line per prompt in input order; the default model directory is byte-for-byte deterministic, and Hugging Face
transformers loads it (model and tokenizer) and generates exactly what we generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bus.text import load_tokenizer
from stages.generate import GenerationRequest, LocalPipeline, generate
from stages.generate_cli import main
from tests.tiny_models import load_hf

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bin" / "dejavu-generate"
NEW = 6
ARGS = ["--model", "default", "--max-new-tokens", str(NEW),
        "--prompt", "Hello", "--prompt-ids", "5,6,7", "--prompt", "é€ ok", "--prompt-ids", "40"]


@pytest.fixture(scope="module")
def script_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One real run of the script: fresh cache dir, another working directory, no PYTHONPATH."""
    cache = tmp_path_factory.mktemp("fresh-cache")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DEJAVU_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS], cwd=tmp_path_factory.mktemp("cwd"), env=env,
                          capture_output=True, text=True, timeout=180)
    return proc, cache


def test_script_is_runnable_from_a_checkout() -> None:
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3")
    assert os.access(SCRIPT, os.X_OK)


def test_script_prints_one_json_line_per_prompt_in_order(script_run, default_model: Path) -> None:  # type: ignore[no-untyped-def]
    proc, _ = script_run
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    tok = load_tokenizer(default_model)
    assert tok is not None
    expected_prompts = [tok.encode("Hello"), [5, 6, 7], tok.encode("é€ ok"), [40]]
    assert [x["prompt_ids"] for x in lines] == expected_prompts
    assert expected_prompts[0] == [b + 3 for b in b"Hello"]  # the byte-level tokenizer: ids 3..258 are bytes
    assert expected_prompts[2] == [b + 3 for b in "é€ ok".encode()]
    for line in lines:
        assert set(line) >= {"prompt_ids", "token_ids", "text", "finish_reason"}
        assert 1 <= len(line["token_ids"]) <= NEW
        assert line["text"] == tok.decode(line["token_ids"], skip_special_tokens=True)
    # the same tokens as the in-process generator on the (separately written) default model
    pipe = LocalPipeline(default_model, 1, num_slots=4, max_seq_len=32)
    ours = generate(pipe, [GenerationRequest(p, NEW) for p in expected_prompts])
    assert [x["token_ids"] for x in lines] == [r.token_ids for r in ours]


def test_default_model_is_deterministic(script_run, default_model: Path) -> None:  # type: ignore[no-untyped-def]
    """Two fresh cache dirs (the script's and the test session's) hold byte-identical model directories."""
    _, cache = script_run
    fresh = cache / default_model.name
    names = sorted(p.name for p in default_model.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (fresh / name).read_bytes() == (default_model / name).read_bytes(), name
    assert not [p for p in cache.iterdir() if p.name.startswith(".default-")], "temporary dir left behind"


def test_cli_mixed_prompts_keep_order_and_stages_agree(default_model: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    outs = []
    for stages in ("1", "3"):
        args = ["--model", str(default_model), "--stages", stages, "--max-new-tokens", "4",
                "--prompt-ids", "9,10", "--prompt", "abc", "--prompt-ids", "11", "--prompt", "z"]
        assert main(args) == 0
        outs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert outs[0] == outs[1]
    assert [x["prompt_ids"] for x in outs[0]] == [[9, 10], [100, 101, 102], [11], [125]]


def test_cli_sampling_is_reproducible(default_model: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["--model", str(default_model), "--max-new-tokens", "8", "--temperature", "0.9", "--top-p", "0.95",
            "--seed", "1234", "--prompt", "The"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    assert main([*args[:-3], "99", "--prompt", "The"]) == 0
    assert capsys.readouterr().out != first


def test_hf_loads_the_default_model_and_agrees(default_model: Path) -> None:
    from transformers import AutoTokenizer

    hf = load_hf(default_model)
    tok = AutoTokenizer.from_pretrained(str(default_model), local_files_only=True)
    text = "Déjà vu ✓"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [b + 3 for b in text.encode()]
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Hello, world", "a", "0123456789" * 3)]
    pipe = LocalPipeline(default_model, 2, num_slots=len(prompts), max_seq_len=64)
    ours = generate(pipe, [GenerationRequest(p, 16) for p in prompts])
    for p, res in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p):]
        ref_ids = ref.tolist()
        if 2 in ref_ids:  # HF stops at EOS (then pads); so do we
            ref_ids = ref_ids[: ref_ids.index(2) + 1]
        assert res.token_ids == ref_ids
    assert any(len(set(r.token_ids)) > 4 for r in ours), "outputs should vary"
