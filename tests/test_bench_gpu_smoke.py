"""experiments/bench_gpu.py in its CPU smoke mode: every benchmark step runs (tiny sizes) and
the summary holds their rows. The GPU sizes are only run on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "bench.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("JAX_PLATFORMS", None)  # the script sets it for its steps
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_gpu.py"), "--platform", "cpu",
                             "--skip-tests", "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "| step | figure | value | status | seconds |" in text
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    for step, figure in [("(a) tests", "note"), ("(b) merges", "device copy bandwidth"),
                         ("(b) merges", "memory-bandwidth bound"), ("(b) merges", "task_arithmetic per candidate"),
                         ("(b) merges", "ties per candidate"), ("(b) merges", "dare_ties per candidate"),
                         ("(c) generation", "jaxmerge.generate tokens/s"), ("(d) ja_math", "note"),
                         ("(d) ja_vlm", "note"), ("(e) tiny step", "DARE-TIES merge, one candidate"),
                         ("(e) tiny step", "evaluation: generate"), ("(e) tiny step", "candidates/s"),
                         ("(e) tiny step", "projection: PS"), ("(e) tiny step", "projection: DFS"),
                         ("(f) decode at scale", "tiny decode")]:
        assert any(r.startswith(f"| {step} | {figure}") for r in rows), f"no row {step} / {figure} in\n{text}"
    # the benchmark steps ran (skipped: only the tests, by flag, and the toy runs, in cpu mode)
    summary = json.loads(out.with_suffix(".json").read_text())
    statuses = {key: step["status"] for key, step in summary["steps"].items()}
    assert statuses["b"] == statuses["c"] == statuses["e"] == statuses["f"] == "ok", statuses
    assert statuses["a"] == statuses["ja_math"] == statuses["ja_vlm"] == "skipped", statuses
    assert statuses["c2"] in ("ok", "not available"), statuses
    assert "failed" not in " ".join(r for r in rows if r.startswith("| (b)")), text
    assert summary["info"]["platform"] == "cpu"
    assert out.with_suffix(".log").exists()
