"""The results table: printed, and saved as `results.json` (data) and `results.md`."""

from __future__ import annotations

import json
import math
from pathlib import Path

from jaxmerge.parallel import is_primary
from jaxmerge.pipeline.rundir import json_safe, write_text_atomic


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"
    lines = ["| model | kind | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['kind']} | "
                     + " | ".join(cell(row["scores"].get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(run_dir: Path, results: dict, columns: list[str]) -> str:
    """results.json (the table as data) and results.md; returns the Markdown table."""
    table = markdown_table(results["rows"], columns)
    if is_primary():  # multi-host: process 0 writes, as it writes the search log
        # Each whole or not at all; results.json, which marks the run finished, last.
        write_text_atomic(run_dir / "results.md", f"# {results['experiment']}\n\n{table}\n")
        write_text_atomic(run_dir / "results.json",
                          json.dumps(json_safe(results), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return table
