"""Run tests/streamer/test_gpu.py where pytest is not installed (the GPU image ships without it).

    python3 -m tests.streamer.gpu_runner [RESULTS.json]

Supports exactly what test_gpu.py uses: `pytest.mark.<name>`, `pytest.mark.parametrize`, `pytest.raises`
(with `match`) and `pytest.skip`. Prints one line per test and exits non-zero if any failed. Where pytest is
installed, bench/gpu_streamer.sh runs the file with pytest instead.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import re
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any


class Skipped(Exception):
    pass


def _shim() -> types.ModuleType:
    mod = types.ModuleType("pytest")

    class Marker:
        def __call__(self, f: Any) -> Any:
            return f

    class Mark:
        def __getattr__(self, name: str) -> Any:
            if name == "parametrize":
                def parametrize(argnames: str, values: Any, ids: Any = None) -> Callable[[Any], Any]:
                    def deco(f: Any) -> Any:
                        f.__dict__.setdefault("_params", []).append((argnames, list(values)))
                        return f
                    return deco
                return parametrize
            return Marker()

    @contextlib.contextmanager
    def raises(exc: type[BaseException], match: str | None = None) -> Iterator[None]:
        try:
            yield
        except exc as e:
            if match is not None and not re.search(match, str(e)):
                raise AssertionError(f"{type(e).__name__}({e!s}) does not match {match!r}") from e
            return
        raise AssertionError(f"DID NOT RAISE {exc.__name__}")

    def skip(reason: str = "") -> None:
        raise Skipped(reason)

    mod.mark = Mark()  # type: ignore[attr-defined]
    mod.raises = raises  # type: ignore[attr-defined]
    mod.skip = skip  # type: ignore[attr-defined]
    return mod


def _cases(fn: Any) -> list[tuple[str, dict[str, Any]]]:
    params = fn.__dict__.get("_params", [])
    if not params:
        return [(fn.__name__, {})]
    names = [p[0] for p in params]
    out = []
    for combo in itertools.product(*(p[1] for p in params)):
        kwargs = dict(zip(names, combo))
        out.append((f"{fn.__name__}[{'-'.join(str(v) for v in combo)}]", kwargs))
    return out


def main(argv: list[str]) -> int:
    sys.modules.setdefault("pytest", _shim())
    module = importlib.import_module("tests.streamer.test_gpu")
    results = []
    for name in dir(module):
        fn = getattr(module, name)
        if not name.startswith("test_") or not callable(fn):
            continue
        for case, kwargs in _cases(fn):
            t0 = time.monotonic()
            try:
                fn(**kwargs)
                outcome, detail = "passed", ""
            except Skipped as e:
                outcome, detail = "skipped", str(e)
            except BaseException:  # noqa: BLE001 - a failing test is reported, the run goes on
                outcome, detail = "failed", traceback.format_exc()
            results.append({"test": case, "outcome": outcome, "seconds": round(time.monotonic() - t0, 2),
                            "detail": detail})
            print(f"{outcome.upper():8} {case} ({results[-1]['seconds']}s)", flush=True)
            if outcome == "failed":
                print(detail, flush=True)
    if len(argv) > 1:
        with open(argv[1], "w") as f:
            json.dump(results, f, indent=1)
    failed = [r for r in results if r["outcome"] == "failed"]
    print(f"{len(results) - len(failed)} ok / {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
