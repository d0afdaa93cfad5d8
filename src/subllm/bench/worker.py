"""One benchmark case in a fresh interpreter, so that its peak memory is its own.

A bench module runs `run_worker("subllm.bench.NAME", case, timeout)`; the module ends with
`if __name__ == "__main__": worker_entry(run_case, "NAME")`, which runs the case and writes
its result (a JSON object) to the file the parent named.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from subllm.atomic import write_atomic


def run_worker(module: str, case: dict[str, Any], timeout: float,
               env: dict[str, str] | None = None,
               exit_reasons: dict[int, str] | None = None) -> dict[str, Any]:
    """The case's result plus `wall_s`, or {"ok": False, "error": ...}; never raises.

    exit_reasons: messages for a module's own exit codes (e.g. a memory watchdog's)."""
    with tempfile.TemporaryDirectory(prefix="subllm-bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--worker", json.dumps(case), str(result_file)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if proc.returncode == 0 and result_file.is_file():
            return {**json.loads(result_file.read_text()), "wall_s": wall}
        if exit_reasons and proc.returncode in exit_reasons:
            error = exit_reasons[proc.returncode]
        elif proc.returncode < 0:
            error = f"killed by signal {-proc.returncode} (out of memory?)"
        else:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            error = f"exit code {proc.returncode}: {tail[0]}"
        return {"ok": False, "error": error, "wall_s": wall}


def worker_entry(run_case: Callable[[dict[str, Any]], dict[str, Any]], name: str) -> NoReturn:
    """`python -m subllm.bench.NAME --worker CASE_JSON RESULT_FILE`: run one case."""
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        write_atomic(Path(sys.argv[3]), json.dumps(run_case(json.loads(sys.argv[2]))))
        sys.exit(0)
    print(f"usage: subllm bench {name} ... (this module's own entry point is the case worker)",
          file=sys.stderr)
    sys.exit(2)
