"""Run directories: one per run, resumed by the same configuration, never overwritten."""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def _record(experiment: str, record: dict) -> dict:
    return json.loads(json.dumps({"experiment": experiment, "config": record}))  # as run.json reads back


def plan_run_dir(out: str | None, experiment: str, record: dict) -> Path:
    """Where the run goes, checked but not created: `out`, or a fresh `runs/<experiment>-<time>`.
    A directory of an unfinished run with the same configuration (`record`, kept in
    run.json) will be resumed; a finished run, or a directory holding anything else, is
    refused: runs are never overwritten."""
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path, n = Path("runs") / f"{experiment}-{stamp}", 1
        while path.exists():
            n += 1
            path = Path("runs") / f"{experiment}-{stamp}-{n}"
        return path
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a run directory: choose a new --out")
    if path.exists() and any(path.iterdir()):
        saved = path / "run.json"
        if (path / "results.json").exists():
            raise FileExistsError(f"{path} holds a finished run (results.json): choose a new --out")
        if not saved.exists() or json.loads(saved.read_text()) != _record(experiment, record):
            raise FileExistsError(f"{path} is not empty and is not an unfinished run of this configuration: "
                                  "choose a new --out")
    return path


def create_run_dir(path: Path, experiment: str, record: dict) -> Path:
    """Makes the planned run directory with its run.json (kept as it is when resuming)."""
    path.mkdir(parents=True, exist_ok=True)
    saved = path / "run.json"
    if not saved.exists():
        staging = saved.with_name("run.json.tmp")
        staging.write_text(json.dumps(_record(experiment, record), indent=2, ensure_ascii=False) + "\n")
        staging.replace(saved)
    return path


def make_run_dir(out: str | None, experiment: str, record: dict) -> Path:
    """`plan_run_dir`, then `create_run_dir`: the run directory, resumed or new."""
    return create_run_dir(plan_run_dir(out, experiment, record), experiment, record)
