"""The pool manifest as a file (streamer/manifest.py): what is written is read back; anything that is not a
manifest, or not an entry, is skipped without an exception; writes replace the file whole. How a restarted
streamer adopts what it lists is tested through real processes in tests/streamer/test_process.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec

from streamer import wire
from streamer.manifest import MAX_BYTES, PoolManifest, PoolRecord, process_start

SPEC = wire.LayoutSpec(0, 2, 2, 8, 1, 4, "float32")


def record(name: str) -> PoolRecord:
    return PoolRecord(name, SPEC, f"/dev/shm/dejavu-kv-x-{name}", f"stage-{name}", 1, os.getpid(),
                      process_start(os.getpid()))


def test_what_is_written_is_read_back_and_replaced_whole(tmp_path: Path) -> None:
    m = PoolManifest(tmp_path / "m.json", "h0")
    assert m.load() == []  # none yet
    m.save([record("a"), record("b")])
    assert m.load() == [record("a"), record("b")]
    m.save([record("b")])
    assert m.load() == [record("b")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]  # no temporary file left
    m.remove()
    assert m.load() == [] and not (tmp_path / "m.json").exists()


def test_anything_else_is_skipped_without_an_exception(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.json"
    m = PoolManifest(path, "h0")
    good = json.loads(msgspec.json.encode(record("a")))
    for content, said in [(b"\x00{not json", "is not a manifest"),
                          (b'{"version": 1, "streamer": "h0"}', "is not a manifest"),
                          (json.dumps({"version": 99, "streamer": "h0", "pools": [good]}).encode(), "version 99"),
                          (b" " * (MAX_BYTES + 1), "at most")]:
        path.write_bytes(content)
        caplog.clear()
        assert m.load() == []
        assert said in caplog.text
    junk = [{**good, "pid": "x"}, {**good, "extra": 1}, [1, 2], {**good, "layout": [0, 2]}, good]
    path.write_text(json.dumps({"version": 1, "streamer": "h0", "pools": junk}))
    caplog.clear()
    assert m.load() == [record("a")]  # only the well-formed entry; the others, one by one
    assert all(f"entry {i} refused" in caplog.text for i in range(4))
    (tmp_path / "gone").mkdir()
    m = PoolManifest(tmp_path / "gone" / "x" / "m.json", "h0")
    m.save([record("a")])  # a directory that does not exist: said, not raised
    assert "cannot write the pool manifest" in caplog.text


def test_a_process_start_time_tells_a_reused_pid_from_its_owner() -> None:
    assert process_start(os.getpid()) == process_start(os.getpid()) > 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert process_start(dead.pid) == 0 and process_start(0) == 0 and process_start(-1) == 0
