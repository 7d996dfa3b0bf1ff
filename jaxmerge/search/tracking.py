"""Experiment tracking of a search: each generation's fitness (best, mean, std of the
population), sigma and best genome so far, to Weights & Biases or TensorBoard, or nowhere.

    config = SearchConfig(tracking=TrackingConfig("tensorboard", stage="ps"))
    run_search(..., config=config, out_dir="runs/x/search")   # opens, logs and closes the tracker

Each backend's package is imported only when it is used (`pip install "jaxmerge[tracking]"`).
Metrics are named `<stage>/<metric>` ("ps/fitness/best", "dfs/sigma"): the stages of one run
(`jaxmerge evolve`'s PS search and layer-path searches) log side by side. The step is the
generation, and a resumed search logs only the generations after its checkpoint:

- tensorboard: event files in `<directory>/<run>/<stage>` (default: `<out_dir>/tensorboard`),
  opened with `purge_step` the first generation to run, so that TensorBoard shows a generation
  run again (a resume that skipped a damaged checkpoint step) once, as it ran last;
- wandb: one W&B run per stage, grouped by the run's name; its id is kept in the search's
  `out_dir` (wandb_run.json), so a resumed search continues the same W&B run (`resume="allow"`;
  offline, a new offline directory of the same id, to `wandb sync`). Files under
  `<directory>` (default: out_dir), as `wandb/`.

run_search logs to a tracker after the generation's checkpoint: a tracker holds no
generation that a resume runs again, unless the resume skips a damaged checkpoint step.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import secrets
from pathlib import Path
from typing import Protocol

import numpy as np

BACKENDS = ("none", "wandb", "tensorboard")
# backend -> the packages it imports (the first is the one named in errors)
_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboardX",)}
INSTALL_HINT = 'pip install "jaxmerge[tracking]"'
WANDB_RUN_FILE = "wandb_run.json"


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    backend: str = "none"  # none | wandb | tensorboard
    directory: str | None = None  # where the tracker's files go (default: the search's out_dir)
    project: str | None = None  # the W&B project (default "jaxmerge")
    run_name: str | None = None  # the run's name (W&B: name prefix and group); default: out_dir's name
    stage: str = "search"  # the metrics' prefix: jaxmerge evolve's "ps", "dfs", "ps_dfs"


class Tracker(Protocol):
    def log_generation(self, generation: int, metrics: dict[str, float], best_genome: np.ndarray | None) -> None:
        """One generation: scalar `metrics` ("fitness/best", "sigma", ...), and the best genome so
        far (None in a Pareto search, which keeps no leader)."""

    def close(self, failed: bool = False) -> None:
        """Flushes and closes; `failed`: the search stopped on an error."""


class NullTracker:
    """search.tracking: none."""

    def log_generation(self, generation: int, metrics: dict[str, float], best_genome: np.ndarray | None) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def missing_package(backend: str) -> str | None:
    """A one-line error when `backend` is unknown or its package is not installed, else None."""
    if backend not in BACKENDS:
        return f"unknown tracker {backend!r} (known: {', '.join(BACKENDS)})"
    for package in _PACKAGES.get(backend, ()):
        if importlib.util.find_spec(package) is None:
            return f"tracking with {backend} needs the {package} package, which is not installed: {INSTALL_HINT}"
    return None


def check_backend(backend: str) -> None:
    """A ValueError of one line (`missing_package`) unless `backend` can be used."""
    problem = missing_package(backend)
    if problem:
        raise ValueError(problem)


class TensorBoardTracker:
    """Scalars per metric and a histogram of the best genome, at step = generation."""

    def __init__(self, config: TrackingConfig, out_dir: Path, start: int):
        check_backend("tensorboard")
        from tensorboardX import SummaryWriter

        self.prefix = config.stage
        directory = Path(config.directory) / (config.run_name or out_dir.name) / config.stage \
            if config.directory else out_dir / "tensorboard"
        # purge_step: TensorBoard discards this directory's earlier events at steps >= start (a
        # generation run again where a damaged checkpoint step was skipped); the suffix keeps
        # each session's file apart (the file name's time is in seconds).
        self.writer = SummaryWriter(str(directory), purge_step=start, filename_suffix=f".from-generation-{start}")

    def log_generation(self, generation: int, metrics: dict[str, float], best_genome: np.ndarray | None) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(f"{self.prefix}/{name}", value, generation)
        if best_genome is not None:
            self.writer.add_histogram(f"{self.prefix}/best_genome", np.asarray(best_genome, np.float64), generation)
        self.writer.flush()  # a long generation's numbers visible now, not at close

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per stage: metrics, the best genome as a list and as a histogram, at step =
    generation; the run's id kept in out_dir for a resumed search."""

    def __init__(self, config: TrackingConfig, out_dir: Path, start: int, details: dict):
        check_backend("wandb")
        import wandb

        self.wandb, self.prefix = wandb, config.stage
        id_file = out_dir / WANDB_RUN_FILE
        run_id = json.loads(id_file.read_text())["id"] if id_file.exists() else secrets.token_hex(6)
        if not id_file.exists():
            staging = id_file.with_name(id_file.name + ".tmp")
            staging.write_text(json.dumps({"id": run_id}) + "\n")
            os.replace(staging, id_file)
        directory = Path(config.directory) if config.directory else out_dir
        directory.mkdir(parents=True, exist_ok=True)
        name = config.run_name or out_dir.name
        self.run = wandb.init(project=config.project or "jaxmerge", name=f"{name}-{config.stage}", group=name,
                              id=run_id, resume="allow", dir=str(directory),
                              config={"stage": config.stage, **details})

    def log_generation(self, generation: int, metrics: dict[str, float], best_genome: np.ndarray | None) -> None:
        row = {f"{self.prefix}/{name}": value for name, value in metrics.items()}
        if best_genome is not None:
            values = np.asarray(best_genome, np.float64)
            row[f"{self.prefix}/best_genome"] = values.tolist()
            row[f"{self.prefix}/best_genome_histogram"] = self.wandb.Histogram(values)
        self.run.log(row, step=generation)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def open_tracker(config: TrackingConfig, out_dir: Path, start: int, details: dict | None = None) -> Tracker:
    """The configured tracker for a search in `out_dir` that runs generations from `start`
    (`details`: the search's settings, W&B's run config). A ValueError of one line for an
    unknown backend or a missing package."""
    check_backend(config.backend)
    if config.backend == "tensorboard":
        return TensorBoardTracker(config, Path(out_dir), start)
    if config.backend == "wandb":
        return WandbTracker(config, Path(out_dir), start, details or {})
    return NullTracker()


def population_metrics(scores: np.ndarray) -> dict[str, float]:
    """fitness/best, /mean, /std of a population's scores [P]; of a Pareto search's [P, M],
    per objective m: fitness/best/m, ..."""
    scores = np.asarray(scores, np.float64)
    stats = {"best": scores.max(axis=0), "mean": scores.mean(axis=0), "std": scores.std(axis=0)}
    if scores.ndim == 1:
        return {f"fitness/{stat}": float(value) for stat, value in stats.items()}
    return {f"fitness/{stat}/{m}": float(v) for stat, values in stats.items() for m, v in enumerate(values)}
