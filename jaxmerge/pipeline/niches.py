"""`search.strategy: natural_niches` in `jaxmerge evolve`: an archive of models fused pairwise
(M2N2, `jaxmerge.search.niche_search`) instead of one merge of the sources into a base.

The sources seed the archive (the base too with `niches.include_base`; no base is needed:
models fine-tuned from different bases of one architecture are the case parameter-space
merging cannot express). Every member and child is scored on the same fitness items: the
first `search.minibatch` rows of each optimised task, each row an item scored in [0, 1].
The archive member best on validation is saved as `merged/`, with `provenance.json` (its
derivation from the sources, which `jaxmerge merge provenance.json OUT` re-derives), and
results.json lists every member's scores per task (the archive's specialists).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from jaxmerge.checkpoint import load as load_checkpoint
from jaxmerge.eval.tasks import FitnessBatches
from jaxmerge.merge.tree import align_source, flat_params, with_language_model_params, with_params
from jaxmerge.models.interfaces import VisionLanguageModel, language_model
from jaxmerge.parallel import Layout, is_primary
from jaxmerge.pipeline.rundir import atomic_file
from jaxmerge.saving import save
from jaxmerge.search.natural_niches import NicheConfig, parameter_order
from jaxmerge.search.niche_search import (
    NicheResult,
    NicheSearchConfig,
    rebuild,
    run_natural_niches,
)
from jaxmerge.search.strategies import NATURAL_NICHES

log = logging.getLogger(__name__)

PROVENANCE_FORMAT = "jaxmerge natural niches provenance"


def niche_config(config, layout: Layout | None) -> NicheSearchConfig:
    """The search's settings from the run's `search:` and `niches:` sections."""
    settings, search = config.niches, config.search
    niches = NicheConfig(archive_size=settings.archive_size, alpha=settings.alpha, matchmaker=settings.matchmaker,
                         splitpoint=settings.splitpoint, interpolation=settings.interpolation)
    return NicheSearchConfig(generations=search.generations, children=search.population or 4, niches=niches,
                             seed=search.seed, chunk_size=search.chunk_size, layout=layout)


@dataclasses.dataclass
class Seeds:
    """The archive's seeds: their names, checkpoint paths, loaded models and language-model
    parameters. With a VLM among them (the first is the host), the archive fuses language
    models and a member is scored in the host's place (its vision tower and projector, as a
    parameter-space merge of a VLM with LLMs is); vocabularies are aligned to the first LLM's
    (a VLM's image-token rows are the host's)."""
    names: list[str]
    paths: list[str]
    models: list
    flats: list[dict]
    host_index: int | None

    @property
    def host(self):
        return None if self.host_index is None else self.models[self.host_index]

    def model(self, flat):
        """The model a member's parameters make: inside the host VLM, or the first seed's architecture."""
        return with_params(self.models[0], flat) if self.host is None else with_language_model_params(self.host, flat)

    def reference(self, index: int) -> tuple[str, object]:
        """(row name, model) of seed `index` on the test sets: an LLM in the host's place."""
        if self.host is None or index == self.host_index:
            return self.names[index], self.models[index]
        return f"{self.names[index]} in the VLM's place (its vision, projector)", self.model(self.flats[index])


def load_seeds(names: list[str], paths: list[str], load) -> Seeds:
    models = [load(path) for path in paths]
    host_index = next((i for i, m in enumerate(models) if isinstance(m, VisionLanguageModel)), None)
    flats = [flat_params(language_model(m)) for m in models]
    reference = next((f for i, f in enumerate(flats) if i != host_index), flats[0])
    return Seeds(names, paths, models, [align_source(reference, f, i) for i, f in enumerate(flats)], host_index)


def source_models(config, load) -> Seeds:
    """The archive's seeds: the genome's models, and its base with `niches.include_base`."""
    genome = config.genome
    names, paths = list(genome.source_names()), list(genome.models)
    if config.niches.include_base:
        names, paths = names + ["base"], paths + [genome.base_model]
    return load_seeds(names, paths, load)


def validation_summary(fitness: FitnessBatches):
    """A member's validation score from its item scores [..., I]: the tasks' weighted mean of
    their mean row scores (the fitness the other searches report)."""
    sizes = [len(t.validation) for t in fitness.tasks]
    bounds = np.cumsum([0] + sizes)

    def summarize(items: np.ndarray) -> np.ndarray:
        items = np.asarray(items, np.float64)
        parts = {t.name: items[..., bounds[i]:bounds[i + 1]].mean(axis=-1) for i, t in enumerate(fitness.tasks)}
        return np.asarray(fitness.combine(parts), np.float64)
    return summarize


def search_niches(config, fitness: FitnessBatches, seeds: Seeds, layout: Layout | None, run_dir: Path,
                  base=None) -> tuple[NicheResult, dict]:
    """The natural-niches search (task-arithmetic children with a `base` model), and its summary
    for results.json. `fitness` scores items (`FitnessBatches(items=True)`)."""
    settings = niche_config(config, layout)

    def score(child, data, batch, key):
        return fitness.score(seeds.model(child), batch)

    log.info("natural niches: an archive of %d seeded by %s; %d children per generation, %d generations; items: "
             "%s", settings.niches.archive_size, ", ".join(seeds.names), settings.children, settings.generations,
             ", ".join(f"{t.name} {fitness.sizes[t.name]}" for t in fitness.tasks))
    began = time.perf_counter()
    result = run_natural_niches(seeds.flats, score, {}, fitness.batches[0], fitness.validation,
                                config=settings, out_dir=run_dir / "natural_niches",
                                host_fitness=fitness.host_fitness if fitness.uses_host else None,
                                summarize=validation_summary(fitness), source_names=seeds.names,
                                base=None if base is None else align_source(seeds.flats[0], flat_params(base), -1))
    return result, summary(result, fitness, settings, time.perf_counter() - began)


def summary(result: NicheResult, fitness: FitnessBatches, settings: NicheSearchConfig, seconds: float) -> dict:
    """results.json's account of the search: settings, the archive's members with their mean
    fitness item score per task and validation score, coverage over generations."""
    bounds = np.cumsum([0] + [fitness.sizes[t.name] for t in fitness.tasks])
    members = []
    for slot, member in enumerate(result.member_ids):
        if member < 0:
            continue
        items = result.member_fitness[slot]
        members.append({"id": member, "slot": slot,
                        "source": result.source_names[member] if member < len(result.source_names) else None,
                        "fitness": {t.name: 100 * float(items[bounds[i]:bounds[i + 1]].mean())
                                    for i, t in enumerate(fitness.tasks)},
                        "validation": 100 * float(result.member_validation[slot])})
    return {"strategy": NATURAL_NICHES, "generations": settings.generations, "children": settings.children,
            "niches": dataclasses.asdict(settings.niches), "best_id": result.best_id,
            "best_validation": 100 * result.best_validation, "archive": members,
            "archive_table": archive_table(members, [t.name for t in fitness.tasks], result.best_id),
            "coverage": [e["coverage"] for e in result.history], "seconds": seconds}


def archive_table(members: list[dict], tasks: list[str], best_id: int) -> str:
    """The archive as a markdown table: each member (a source, or a child by its id), its mean
    fitness item score per task and its validation score; the best marked."""
    lines = ["| member | " + " | ".join(f"{t} (fitness)" for t in tasks) + " | validation |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for m in sorted(members, key=lambda m: -m["validation"]):
        name = m["source"] or f"child {m['id']}"
        name = f"**{name}** (best)" if m["id"] == best_id else name
        lines.append(f"| {name} | " + " | ".join(f"{m['fitness'][t]:.1f}" for t in tasks)
                     + f" | {m['validation']:.1f} |")
    return "\n".join(lines)


def provenance(result: NicheResult, names: list[str], paths: list[str], settings: NicheSearchConfig,
               base_path: str | None = None) -> dict:
    """provenance.json: the best member's derivation, with what re-deriving it needs (the base's
    path where the children were task-arithmetic)."""
    niches = settings.niches
    return {"format": PROVENANCE_FORMAT, "version": 1,
            "sources": [{"name": n, "path": str(p)} for n, p in zip(names, paths, strict=True)],
            "task_vectors_of": None if base_path is None else str(base_path),
            "interpolation": niches.interpolation, "splitpoint": niches.splitpoint,
            "member": result.best_id, "tree": result.ancestry()}


def save_best(result: NicheResult, seeds: Seeds, out_dir: Path, inputs: list[str]):
    """The best member saved (inside the host VLM, if there is one); the model."""
    model = seeds.model(result.best_params)
    save(model, out_dir, overwrite=True, inputs=inputs)
    return model


def write_plots(result: NicheResult, run_dir: Path) -> None:
    if not is_primary():
        return
    from jaxmerge.search.report import plot_archive  # matplotlib: only where plots are drawn

    with atomic_file(run_dir / "coverage.png") as path:
        plot_archive(result.history, path)


def read_provenance(path) -> dict:
    """A provenance file, checked: its format, sources and tree."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable provenance file ({error})") from None
    if not isinstance(document, dict) or document.get("format") != PROVENANCE_FORMAT:
        raise ValueError(f"{path}: not a jaxmerge natural-niches provenance file (its \"format\" is "
                         f"{document.get('format') if isinstance(document, dict) else None!r})")
    for key in ("sources", "tree", "interpolation", "splitpoint"):
        if key not in document:
            raise ValueError(f"{path}: no {key!r} field")
    return document


def merge_provenance(path, out_dir, *, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Re-derives the model of a provenance file from its sources alone and saves it to
    `out_dir` (written atomically; replaced only if it is our own earlier output)."""
    document = read_provenance(path)
    base_dir = Path(path).resolve().parent
    def located(path) -> Path:
        path = Path(path)
        return path if path.is_absolute() or path.exists() else base_dir / path

    def load(path):
        return load_checkpoint(located(path), dtype=dtype)

    seeds = load_seeds([s["name"] for s in document["sources"]], [s["path"] for s in document["sources"]], load)
    base = document.get("task_vectors_of")
    base = None if base is None else align_source(seeds.flats[0], flat_params(language_model(load(base))), -1)
    niches = NicheConfig(archive_size=2, splitpoint=document["splitpoint"], interpolation=document["interpolation"])
    params = rebuild(document["tree"], dict(zip(seeds.names, seeds.flats, strict=True)),
                     parameter_order(seeds.flats[0]), niches, base)
    save(seeds.model(params), out_dir, overwrite=overwrite,
         inputs=[str(s["path"]) for s in document["sources"]] + [str(path)])
    return Path(out_dir)
