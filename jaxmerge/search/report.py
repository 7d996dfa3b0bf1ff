"""Plots of a search: the fitness curve and the evolved parameters as a heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxmerge.search.genome import GenomeSpace  # noqa: E402
from jaxmerge.search.path_genome import PathSpace  # noqa: E402


def _saved_scores(fig, ax, path) -> Path:
    """A figure of scores over the generations, labelled and written to `path`."""
    ax.set_xlabel("generation")
    ax.set_ylabel("score")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _curves(history: list[dict], path, curves: list[tuple[str, str, dict]]) -> Path:
    """Scores over the generations: one line per (log key, label, matplotlib options)."""
    generations = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label, options in curves:
        ax.plot(generations, [h[key] for h in history], label=label, **options)
    return _saved_scores(fig, ax, path)


def plot_history(history: list[dict], path, objectives: list[str] | None = None) -> Path:
    """The fitness curve; a Pareto search's (`objectives` named): each objective's best and mean."""
    if not objectives:
        return _curves(history, path, [("best_fitness", "best fitness (minibatch)", {}),
                                        ("mean_fitness", "mean fitness", {"alpha": 0.6}),
                                        ("best_validation", "best validation so far", {})])
    generations = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, name in enumerate(objectives):
        line, = ax.plot(generations, [h["best_fitness"][m] for h in history], label=f"{name}: best (minibatch)")
        ax.plot(generations, [h["mean_fitness"][m] for h in history], color=line.get_color(), alpha=0.5,
                linestyle="--", label=f"{name}: mean")
    return _saved_scores(fig, ax, path)


def plot_front(population: np.ndarray, front: np.ndarray, objectives: list[str], path,
               reference: dict[str, np.ndarray] | None = None) -> Path:
    """The final population's validation scores ([P, M]) with its front ([F, M]) marked, one
    panel per pair of objectives; `reference`: {label: [M]} points drawn beside them (e.g.
    the sources, a single-objective run)."""
    pairs = [(i, j) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        ax.scatter(population[:, i], population[:, j], s=14, color="0.7", label="final population")
        order = np.argsort(front[:, i])
        # two objectives: the front is a curve; more: its projections are points, not a curve
        ax.plot(front[order, i], front[order, j], "o-" if len(objectives) == 2 else "o", color="C3", markersize=5,
                label="front")
        for k, (label, point) in enumerate((reference or {}).items()):
            ax.scatter([point[i]], [point[j]], marker="*s^Dv"[k % 5], s=70, color=f"C{k}", label=label)
        ax.set_xlabel(objectives[i])
        ax.set_ylabel(objectives[j])
    axes[0, -1].legend(fontsize="small")
    fig.suptitle("Pareto front (validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_genome(space: GenomeSpace, genome, path, source_names: list[str] | None = None) -> Path:
    """One heatmap per evolved parameter: sources x layer groups (the last column is the
    embeddings/head group when layers are split)."""
    values = space.values(np.asarray(genome))
    names = source_names or [f"source {i}" for i in range(space.num_sources)]
    fig, axes = plt.subplots(len(values), 1, figsize=(max(4, 0.4 * space.num_groups + 3), 1.5 + 1.2 * len(values)
                                                     * max(1, space.num_sources / 3)), squeeze=False)
    for ax, (name, grid) in zip(axes[:, 0], values.items(), strict=True):
        image = ax.imshow(np.asarray(grid), aspect="auto", cmap="viridis")
        ax.set_title(name)
        ax.set_yticks(range(space.num_sources), names)
        labels = [str(g) for g in range(space.layer_groups)] + (["emb/head"] if space.num_groups > 1 else [])
        ax.set_xticks(range(space.num_groups), labels)
        ax.set_xlabel("layer group")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_path(space: PathSpace, genome, path, model_names: list[str] | None = None) -> Path:
    """The evolved layer path: hop (x) against stored layer (y, grouped by model), each hop
    coloured by the scale its input gets."""
    hops = space.describe(genome)["path"]
    names = model_names or [chr(ord("A") + i) for i in range(len(space.layers_per_model))]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(hops) + 2), 3.5))
    layers = [i for i, _ in hops]
    ax.plot(range(len(hops)), layers, color="grey", linewidth=0.8, zorder=1)
    points = ax.scatter(range(len(hops)), layers, c=[s for _, s in hops], cmap="coolwarm", zorder=2,
                        vmin=min(0.5, *[s for _, s in hops]), vmax=max(1.5, *[s for _, s in hops]))
    start = 0
    ticks, labels = [], []
    for name, count in zip(names, space.layers_per_model, strict=True):
        ax.axhspan(start - 0.5, start + count - 0.5, alpha=0.06 if len(ticks) % 2 else 0.12, color="C0")
        ticks += [start, start + count - 1]
        labels += [f"{name} 0", f"{name} {count - 1}"]
        start += count
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("hop")
    ax.set_ylabel("stored layer")
    fig.colorbar(points, ax=ax, label="input scale")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_archive(history: list[dict], path) -> Path:
    """A natural-niches search over its generations: the archive's coverage (each fitness
    item's best score among the members, averaged), its best and mean member (mean item
    score), and the best validation so far."""
    return _curves(history, path, [("coverage", "coverage (best member per item)", {}),
                                   ("best_fitness", "best member (mean item score)", {}),
                                   ("mean_fitness", "mean member", {"alpha": 0.6}),
                                   ("best_validation", "best validation so far", {})])
