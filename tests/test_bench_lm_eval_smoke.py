"""experiments/bench_lm_eval.py at its tiny preset, one round: it runs lm-eval's hf backend and the
jaxmerge backend on its three tasks, and their results agree. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_lm_eval_tiny_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_lm_eval.py"), "--shape", "tiny",
                             "--rounds", "1", "--model", str(tmp_path / "model"), "--json", str(out)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["agree"] == {"bench_mc": True, "bench_ppl": True, "bench_gen": True}, result.stdout
    rows = {(row["task"], row["clock"], row["backend"]): row for row in summary["rows"]}
    for task, requests in (("bench_mc", 12 * 4), ("bench_ppl", 6), ("bench_gen", 6)):
        for backend in ("hf", "jaxmerge"):
            row = rows[task, "model", backend]
            assert row["requests"] == requests and row["tokens"] > 0 and len(row["seconds"]) == 1, row
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "tokenizer.json").is_file()
    assert "jaxmerge / hf throughput" in result.stdout and "agreement (hf / jaxmerge):" in result.stdout
