"""The results table: logged, and saved as `results.json` (data) and `results.md`; what it says of a search."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from jaxmerge.parallel import is_primary
from jaxmerge.pipeline.rundir import json_safe, write_text_atomic
from jaxmerge.search import SearchConfig, SearchResult, default_population_size
from jaxmerge.search.evolution import strategy_name

log = logging.getLogger(__name__)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def scored_columns(rows: list[dict]) -> list[str]:
    """The table's columns, in the rows' order, less those no row has a score in."""
    columns = list(dict.fromkeys(c for row in rows for c in row["scores"]))
    return [c for c in columns if any(not _missing(row["scores"].get(c)) for row in rows)]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        return "—" if _missing(value) else f"{value:.1f}"
    lines = ["| model | kind | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['model']} | {row['kind']} | "
                     + " | ".join(cell(row["scores"].get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(run_dir: Path, results: dict, columns: list[str], sections: dict[str, str] | None = None) -> str:
    """results.json (the table as data) and results.md (the table, then `sections`: {title:
    Markdown}); returns the Markdown table."""
    table = markdown_table(results["rows"], columns)
    if is_primary():  # multi-host: process 0 writes, as it writes the search log
        # Each whole or not at all; results.json, which marks the run finished, last.
        extra = "".join(f"\n## {title}\n\n{text}\n" for title, text in (sections or {}).items())
        write_text_atomic(run_dir / "results.md", f"# {results['experiment']}\n\n{table}\n{extra}")
        write_text_atomic(run_dir / "results.json",
                          json.dumps(json_safe(results), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return table


def search_summary(space, search: SearchConfig, result: SearchResult, seconds: float) -> dict:
    """What results.json says of a search, rates included (logged too)."""
    instance = not isinstance(search.strategy, (str, type))  # an evosax algorithm made by the caller
    population = search.strategy.population_size if instance else \
        search.population_size or default_population_size(space.num_dims)
    done, spent = len(result.history), sum(h["seconds"] for h in result.history)
    summary = {**space.summary(), "strategy": strategy_name(search.strategy), "generations": search.generations,
               "population": population, "best_validation": 100 * result.best_validation,
               "genome": space.describe(result.best_genome), "seconds": seconds,
               "generations_per_minute": 60 * done / spent, "candidates_per_second": done * population / spent}
    log.info("search: %d generations x %d candidates in %.0f s (%.1f generations/min, %.1f candidates/s, first "
             "generation's compile included); evolved %s", done, population, spent,
             summary["generations_per_minute"], summary["candidates_per_second"], json.dumps(summary["genome"]))
    return summary
