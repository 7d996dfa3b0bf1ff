"""The natural-niches search (M2N2): an archive of models evolving by pairwise fusion.

    result = run_natural_niches(sources, score_fn, data, fitness_batch, validation_batch,
                                config=NicheSearchConfig(generations=50, children=4,
                                                         niches=NicheConfig(archive_size=8)),
                                out_dir="runs/x")

`sources`: the models that seed the archive, flat dicts {path: array} of one architecture
(no base model: models fine-tuned from different bases are the interesting case). With a
`base`, children are task-arithmetic: the parents' task vectors fused, the base added back.
score_fn(child, data, batch, key) -> per-item scores [I] in [0, 1] of a model's flat
parameters on a batch (with `host_fitness`, any outputs, turned into [P, I] on the host by
host_fitness(outputs, batch_index)). Every member and child is scored on the same items,
`fitness_batch` (resource sharing compares members item by item); a member's validation
score is `summarize` of its item scores on `validation_batch` (default: their mean).

Each generation draws `children` children from the archive as it stands (parents by shared
fitness and attraction, a mixing value and a split point: `jaxmerge.search.natural_niches`),
scores them as one batch (the archive is data, a child's parents and split are data: one
program for every generation), and inserts them in order, each replacing the least fit of
the archive and itself. The archive's leader (best mean item score) is scored on validation
when it changes; at the end every member is, and the best on validation is the result.

Checkpoints hold the archive's bookkeeping, not its parameters (N models): a resume rebuilds
the parameters by replaying the generations' insertions, recorded in the log
(generations.jsonl: each child's parents, mixing value, split point and slot) with the very
program that made them, and checks each member against the checkpoint's fingerprints. Killed
at any point, a rerun ends as an uninterrupted run would. The log is also the provenance:
`ancestry(records, id)` is any member's derivation from the sources as a tree of
(A, B, w, split), and `rebuild(tree, sources, order, niches)` re-derives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.parallel import Layout, is_primary, shard_data
from jaxmerge.search.evolution import (
    PopulationScorer,
    SearchConfig,
    announce_resume,
    eta_seconds,
    generation_keys,
    resume_search,
    save_generation,
    strong_types,
)
from jaxmerge.search.natural_niches import (
    ArchiveState,
    Children,
    NicheConfig,
    ParameterOrder,
    child_params,
    child_records,
    coverage,
    empty_archive,
    parameter_order,
    sample_children,
    update_archive,
)

log = logging.getLogger(__name__)
Flat = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class NicheSearchConfig:
    generations: int = 50
    children: int = 4  # per generation, scored as one batch (the population of a CMA-ES generation)
    niches: NicheConfig = NicheConfig(archive_size=8)
    seed: int = 0
    chunk_size: int | None = None  # as SearchConfig's: candidates per vmapped batch (None: the platform's)
    layout: Layout | None = None  # devices: children split over the population axis, the archive over the model's

    def __post_init__(self):
        if self.children < 1:
            raise ValueError(f"NicheSearchConfig.children must be at least 1, got {self.children}")
        if self.generations < 0:
            raise ValueError(f"NicheSearchConfig.generations must be at least 0, got {self.generations}")


@dataclasses.dataclass
class NicheResult:
    best_params: Flat  # the archive member best on validation
    best_id: int
    best_validation: float
    member_ids: list[int]  # the final archive's members (slot order; -1: empty)
    member_fitness: np.ndarray  # [N, I] their item scores on the fitness batch
    member_validation: np.ndarray  # [N] their validation scores (NaN: empty)
    records: dict[int, dict]  # every child ever made: {id: its parents' ids, w, split, ...}
    source_names: list[str]
    history: list[dict]
    out_dir: Path

    def ancestry(self, member_id: int | None = None) -> dict:
        """The derivation of a member (default: the best) from the sources, as a tree."""
        return ancestry(self.records, self.best_id if member_id is None else member_id, self.source_names)


# --- the genome of a child, as PopulationScorer sees it -------------------------------------------------------

_SPLIT_WORD = 1 << 16  # a split position (< 2^31) as two float32-exact halves


def _encode(children: Children) -> jax.Array:
    """[P, 6] float32: a, b, w, block, the position's high and low 16 bits (each exact in float32)."""
    return jnp.stack([children.a.astype(jnp.float32), children.b.astype(jnp.float32), children.w,
                      children.block.astype(jnp.float32), (children.position // _SPLIT_WORD).astype(jnp.float32),
                      (children.position % _SPLIT_WORD).astype(jnp.float32)], axis=-1)


@dataclasses.dataclass(frozen=True)
class FusionSpace:
    """A `SearchSpace` whose genome is one child: its parents' slots, w and split point."""

    num_dims: int = 6

    def initial(self) -> jax.Array:
        return jnp.zeros(self.num_dims)

    def decode(self, genome: jax.Array, paths) -> dict:
        as_int = lambda x: jnp.round(x).astype(jnp.int32)  # noqa: E731
        return {"a": as_int(genome[0]), "b": as_int(genome[1]), "w": genome[2], "block": as_int(genome[3]),
                "position": as_int(genome[4]) * _SPLIT_WORD + as_int(genome[5])}

    def describe(self, genome) -> dict:
        return {k: np.asarray(v).item() for k, v in self.decode(jnp.asarray(genome), ()).items()}

    def summary(self) -> dict:
        return {"kind": "natural niches child", "num_dims": self.num_dims}

    def cost(self, genome: jax.Array) -> jax.Array:
        return jnp.float32(0.0)


def _member_genomes(slots, order: ParameterOrder) -> jax.Array:
    """Genomes that reproduce members as they are: A = B = the member, w = 0, no split."""
    slots = jnp.asarray(slots, jnp.int32)
    zeros = jnp.zeros(slots.shape, jnp.float32)
    return _encode(Children(slots, slots, zeros, jnp.full(slots.shape, order.num_blocks, jnp.int32),
                            jnp.zeros(slots.shape, jnp.int32)))


# --- programs, each compiled once per search -------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "num_children", "order"))
def _sample(key, state: ArchiveState, config: NicheConfig, num_children: int, order: ParameterOrder) -> Children:
    return sample_children(key, state, config, num_children, order)


@functools.partial(jax.jit, static_argnames=("alpha",))
def _insertions(state: ArchiveState, scores: jax.Array, ids: jax.Array, alpha: float):
    """The bookkeeping of inserting P children in order (scores [P, I], ids [P]), and each one's
    slot (-1: not inserted): `update_archive` on the state alone (no parameters)."""
    def step(state, child):
        child_scores, child_id = child
        state, _, slot = update_archive(state, {}, child_scores, {}, child_id, alpha)
        return state, slot
    return jax.lax.scan(step, state, (scores, ids))


@functools.partial(jax.jit, static_argnames=("order", "config"), donate_argnums=(0,))
def _place(archive: Flat, children: Children, slots: jax.Array, base: Flat | None, order: ParameterOrder,
           config: NicheConfig) -> Flat:
    """The archive with each inserted child's parameters in its slot (slots [P], -1: none;
    a later child overwrites an earlier one's slot). Every child is made from the archive as it
    was before the step; one not kept is not made again (most are not). The one program that
    writes members: a resume replays it bit for bit."""
    def make(child_and_slot):
        c, slot = child_and_slot
        return jax.lax.cond(slot >= 0,
                            lambda: child_params(archive, c.a, c.b, c.w, c.block, c.position, order, config, base),
                            lambda: {p: jnp.zeros(leaf.shape[1:], leaf.dtype) for p, leaf in archive.items()})
    made = jax.lax.map(make, (children, slots))
    out = dict(archive)
    for j in range(slots.shape[0]):
        slot = jnp.maximum(slots[j], 0)
        out = {p: leaf.at[slot].set(jnp.where(slots[j] >= 0, made[p][j], leaf[slot])) for p, leaf in out.items()}
    return out


@functools.partial(jax.jit, donate_argnums=(0,))
def _place_sources(archive: Flat, sources: Flat, slots: jax.Array) -> Flat:
    """The archive with source k in slots[k] (-1: not kept); sources {path: [S, ...]}."""
    out = dict(archive)
    for k in range(slots.shape[0]):
        slot = jnp.maximum(slots[k], 0)
        out = {p: leaf.at[slot].set(jnp.where(slots[k] >= 0, sources[p][k].astype(leaf.dtype), leaf[slot]))
               for p, leaf in out.items()}
    return out


@jax.jit
def fingerprints(archive: Flat) -> jax.Array:
    """[N] float32 per member: the sum of its parameters and of their squares, each weighted by
    the leaf's position (a checksum a resume compares bit for bit)."""
    total = 0.0
    for i, p in enumerate(sorted(archive)):
        x = archive[p].reshape(archive[p].shape[0], -1).astype(jnp.float32)
        total = total + (i + 1) * (jnp.sum(x, axis=1) + jnp.sum(x * x, axis=1) / (i + 2))
    return total


# --- provenance ---------------------------------------------------------------------------------------------

def ancestry(records: dict[int, dict], member_id: int, source_names: list[str]) -> dict:
    """A member's derivation from the sources: {"source": name} for a source (ids 0..S-1), else
    {"id", "w", "split", "a": tree, "b": tree}: the child of A and B by w and the split point."""
    if member_id < len(source_names):
        return {"id": member_id, "source": source_names[member_id]}
    record = records[member_id]
    return {"id": member_id, "w": record["w"], "split": record["split"], "block": record["block"],
            "position": record["position"],
            "a": ancestry(records, record["parent_a"], source_names),
            "b": ancestry(records, record["parent_b"], source_names)}


def rebuild(tree: dict, sources: dict[str, Flat], order: ParameterOrder, niches: NicheConfig,
            base: Flat | None = None) -> Flat:
    """The parameters of a provenance tree (`ancestry`), re-derived from the sources (by name)
    (and the base, for a search of task-arithmetic children): each child made by `child_params`
    from its two parents alone. Equal to the search's member up to float32 rounding (the search
    made it inside a larger program)."""
    made: dict[int, Flat] = {}
    pair = jax.jit(functools.partial(child_params, order=order, config=niches))

    def build(node) -> Flat:
        if "source" in node:
            if node["source"] not in sources:
                raise ValueError(f"the provenance names source {node['source']!r}, which is not among the given "
                                 f"sources ({', '.join(sources)})")
            return sources[node["source"]]
        if node["id"] not in made:
            a, b = build(node["a"]), build(node["b"])
            archive = {p: jnp.stack([a[p], b[p]]) for p in a}
            made[node["id"]] = pair(archive, 0, 1, jnp.float32(node["w"]), node["block"], node["position"],
                                    base=base)
        return made[node["id"]]

    return build(tree)


# --- the loop -----------------------------------------------------------------------------------------------

def _stacked(models: list[Flat]) -> Flat:
    return {p: jnp.stack([m[p] for m in models]) for p in models[0]}


def _children_of(entry: dict) -> Children:
    """A logged generation's children, as drawn."""
    def column(name, dtype):
        return jnp.asarray([child[name] for child in entry["children"]], dtype)
    return Children(column("a", jnp.int32), column("b", jnp.int32), column("w", jnp.float32),
                    column("block", jnp.int32), column("position", jnp.int32))


def run_natural_niches(sources: list[Flat], score_fn: Callable, data: Any, fitness_batch: Any,
                       validation_batch: Any, *, config: NicheSearchConfig, out_dir, progress: bool = True,
                       host_fitness: Callable[[Any, int | None], np.ndarray] | None = None,
                       summarize: Callable[[np.ndarray], np.ndarray] | None = None,
                       source_names: list[str] | None = None, base: Flat | None = None) -> NicheResult:
    out_dir = Path(out_dir)
    primary = is_primary()
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
    names = _check_sources(sources, source_names)
    summarize = summarize or (lambda items: np.mean(items, axis=-1))
    niches, order = config.niches, parameter_order(sources[0])

    def score(params, data, batch, key):  # one child of the archive in `data`
        child = child_params(data["archive"], params["a"], params["b"], params["w"], params["block"],
                             params["position"], order, niches, data["base"])
        return score_fn(child, data["rest"], batch, key)

    search = SearchConfig(chunk_size=config.chunk_size, layout=config.layout)
    scorer = PopulationScorer.create(FusionSpace(), (), score, {"rest": data, "base": base}, [fitness_batch],
                                     validation_batch, search, host_fitness=host_fitness)
    rest, base = scorer.data["rest"], scorer.data["base"]
    # On a mesh the archive is sharded as the models of a CMA-ES search are; the programs that
    # update it keep its sharding.
    place = (lambda tree: shard_data(tree, scorer.mesh)) if scorer.mesh is not None else (lambda tree: tree)
    init_key, root = jax.random.split(jax.random.key(config.seed))

    def evaluate(archive: Flat, genomes: jax.Array, batch_index: int | None, key) -> np.ndarray:
        """[P, I] item scores of the children `genomes` of `archive`."""
        of_archive = dataclasses.replace(scorer, data={"archive": archive, "rest": rest, "base": base})
        return np.asarray(of_archive(genomes, batch_index, key), np.float32)

    source_stack = _stacked(sources)
    source_scores = evaluate(place(source_stack), _member_genomes(np.arange(len(sources)), order), 0, init_key)
    num_items = source_scores.shape[-1]
    state, archive = empty_archive(niches, num_items, sources[0])
    state, source_slots = _insertions(state, jnp.asarray(source_scores), jnp.arange(len(sources), dtype=jnp.int32),
                                      niches.alpha)
    archive = _place_sources(place(archive), place(source_stack), source_slots)
    initial = {"state": strong_types(state), "generation": jnp.int32(0), "source_slots": source_slots,
               "fingerprints": fingerprints(archive), "best_validation": jnp.float32(-jnp.inf),
               "best_id": jnp.int32(-1)}
    resumed = resume_search(out_dir, initial)
    manager, saved, history, log_path = resumed.manager, resumed.saved, resumed.history, resumed.log_path
    announce_resume(resumed, config.generations, out_dir)
    start, state = int(saved["generation"]), saved["state"]
    if start:  # the archive's parameters: replayed from the log, then checked
        try:
            archive = _replayed(archive, history, saved["fingerprints"], base, order, niches, log_path)
        except ValueError:
            manager.close()
            raise
    records = {c["id"]: c for entry in history for c in entry["children"]}
    best_validation, best_id = float(saved["best_validation"]), int(saved["best_id"])
    validated: dict[int, float] = {e["leader"]: e["validation"] for e in history}
    level = logging.INFO if progress and primary else logging.DEBUG
    session_seconds: list[float] = []
    done = start
    try:
        with (log_path.open("a") if primary else contextlib.nullcontext()) as log_file:
            for generation in range(start, config.generations):
                began = time.perf_counter()
                sample_key, eval_key, val_key, _ = generation_keys(root, generation)
                children = _sample(sample_key, state, niches, config.children, order)
                scores = evaluate(archive, _encode(children), 0, eval_key)  # [P, I]
                first_id = len(sources) + generation * config.children
                ids = jnp.arange(first_id, first_id + config.children, dtype=jnp.int32)
                drawn = child_records(children, state.member_ids, order)
                state, slots = _insertions(state, jnp.asarray(scores), ids, niches.alpha)
                state = strong_types(state)
                archive = _place(archive, children, slots, base, order, niches)
                kids = _child_entries(ids, drawn, children, slots, scores)
                records.update({k["id"]: k for k in kids})
                filled, means, leader_slot, leader = _leader(state)
                if leader not in validated:
                    genome = _member_genomes([leader_slot], order)
                    validated[leader] = float(summarize(evaluate(archive, genome, None, val_key))[0])
                if validated[leader] > best_validation:
                    best_validation, best_id = validated[leader], leader
                entry = {"generation": generation, "children": kids,
                         "archive": np.asarray(state.member_ids).tolist(),
                         "best_fitness": float(np.max(means)), "mean_fitness": float(np.mean(means[filled])),
                         "coverage": float(np.mean(np.asarray(coverage(state)))),
                         "leader": leader, "validation": validated[leader], "best_validation": best_validation,
                         "seconds": time.perf_counter() - began}
                if primary:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                save_generation(manager, {"state": state, "generation": jnp.int32(generation + 1),
                                          "source_slots": source_slots, "fingerprints": fingerprints(archive),
                                          "best_validation": jnp.float32(best_validation),
                                          "best_id": jnp.int32(best_id)}, generation)
                done = generation + 1
                history.append(entry)
                session_seconds.append(time.perf_counter() - began)
                inserted = sum(k["slot"] >= 0 for k in kids)
                log.log(level, "generation %d/%d: %d of %d children kept; archive fitness best %.4g mean %.4g, "
                        "coverage %.3g; leader %d validation %.4g, best so far %.4g; %.2f s/generation, ETA %s",
                        generation + 1, config.generations, inserted, config.children, entry["best_fitness"],
                        entry["mean_fitness"], entry["coverage"], leader, validated[leader], best_validation,
                        session_seconds[-1], _eta(session_seconds, config.generations - generation - 1))
    except KeyboardInterrupt:
        log.warning("interrupted at generation %d of %d; rerun the same command to resume", done + 1,
                    config.generations)
        raise
    finally:
        manager.close()
    return _result(archive, state, order, evaluate, summarize, root, config, records, names, history, out_dir)


def _child_entries(ids, drawn: list[dict], children: Children, slots, scores: np.ndarray) -> list[dict]:
    """A generation's children as the log keeps them: id, parents (ids and slots), w, split
    (global index and (block, position)), the slot each went into (-1: none), mean item score."""
    columns = zip(np.asarray(ids), drawn, np.asarray(children.a), np.asarray(children.b),
                  np.asarray(children.block), np.asarray(children.position), np.asarray(slots), scores, strict=True)
    return [{"id": int(i), **record, "a": int(a), "b": int(b), "block": int(block), "position": int(position),
             "slot": int(slot), "score": float(np.mean(items))}
            for i, record, a, b, block, position, slot, items in columns]


def _check_sources(sources: list[Flat], names: list[str] | None) -> list[str]:
    """The sources' names (default source0, source1, ...), once they are known to be models of one shape."""
    if not sources:
        raise ValueError("natural niches needs at least one source model")
    names = list(names) if names is not None else [f"source{k}" for k in range(len(sources))]
    if len(names) != len(sources):
        raise ValueError(f"{len(names)} source names for {len(sources)} sources")
    shapes = {p: tuple(v.shape) for p, v in sources[0].items()}
    for name, model in zip(names, sources, strict=True):
        if {p: tuple(v.shape) for p, v in model.items()} != shapes:
            raise ValueError(f"source {name!r}: its parameters' paths or shapes differ from {names[0]!r}'s "
                             "(natural niches fuses models of one architecture)")
    return names


def _replayed(archive: Flat, history: list[dict], expected, base: Flat | None, order: ParameterOrder,
              niches: NicheConfig, log_path: Path) -> Flat:
    """The archive after the logged generations, by the program that made it, checked against
    the checkpoint's fingerprints."""
    for entry in history:
        slots = jnp.asarray([c["slot"] for c in entry["children"]], jnp.int32)
        archive = _place(archive, _children_of(entry), slots, base, order, niches)
    expected, actual = np.asarray(expected), np.asarray(fingerprints(archive))
    if not np.array_equal(expected, actual):
        raise ValueError(f"{log_path.parent}: the archive rebuilt from {log_path.name} does not match the "
                         f"checkpoint's fingerprints (slots {np.flatnonzero(expected != actual).tolist()}): the log "
                         "and the checkpoint disagree; move the directory away to start afresh")
    return archive


def _leader(state: ArchiveState) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(filled [N], mean item score [N] (-inf: empty), the leader's slot, its id): the leader
    is the member with the best mean item score."""
    filled = np.asarray(state.filled)
    means = np.where(filled, np.asarray(state.scores).mean(axis=1), -np.inf)
    slot = int(np.argmax(means))
    return filled, means, slot, int(np.asarray(state.member_ids)[slot])


def _eta(seconds: list[float], remaining: int) -> str:
    return str(datetime.timedelta(seconds=round(eta_seconds(seconds, remaining))))


def _result(archive, state, order, evaluate, summarize, root, config, records, names, history, out_dir) -> NicheResult:
    """Every member scored on validation; the best is the result."""
    filled = np.asarray(state.filled)
    slots = np.flatnonzero(filled)
    validation = np.full(filled.shape, np.nan)
    scores = evaluate(archive, _member_genomes(slots, order), None, jax.random.fold_in(root, config.generations))
    validation[slots] = summarize(scores)
    best_slot = int(slots[np.argmax(validation[slots])])
    ids = np.asarray(state.member_ids)
    best = {p: leaf[best_slot] for p, leaf in archive.items()}
    return NicheResult(best, int(ids[best_slot]), float(validation[best_slot]), ids.tolist(),
                       np.asarray(state.scores), validation, records, names, history, out_dir)
