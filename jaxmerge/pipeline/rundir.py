"""Run directories: one per run, resumed by the same configuration, never overwritten."""

from __future__ import annotations

import datetime
import json
from pathlib import Path


def make_run_dir(out: str | None, experiment: str, record: dict) -> Path:
    """`out`, or a fresh `runs/<experiment>-<timestamp>`. A directory of an unfinished run
    with the same configuration (`record`, kept in run.json) is resumed; a finished run, or a
    directory holding anything else, is refused: runs are never overwritten."""
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path, n = Path("runs") / f"{experiment}-{stamp}", 1
        while path.exists():
            n += 1
            path = Path("runs") / f"{experiment}-{stamp}-{n}"
    else:
        path = Path(out)
    record = json.loads(json.dumps({"experiment": experiment, "config": record}))  # as run.json reads back
    if path.exists() and any(path.iterdir()):
        saved = path / "run.json"
        if (path / "results.json").exists():
            raise FileExistsError(f"{path} holds a finished run (results.json): choose a new --out")
        if not saved.exists() or json.loads(saved.read_text()) != record:
            raise FileExistsError(f"{path} is not empty and is not an unfinished run of this configuration: "
                                  "choose a new --out")
        return path  # resume
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path
