"""Natural niches (M2N2) against CMA-ES PS on the ja_math toy, at equal candidate evaluations.

    python experiments/niches_vs_cma.py [--seeds 0,1,2] [--generations 40] [--population 8]
        [--root runs/niches_vs_cma]

For each seed, with the two useful sources alone and with the distractors' pool (five
sources): `python -m jaxmerge.experiments.ja_math --strategy natural_niches` and `--strategy
cma_es`, each --generations generations of --population candidates (natural niches: children
per generation), no layer-path search. CMA-ES merges the sources into the toy's base; natural
niches never sees the base (the archive holds the sources and their descendants only): the
case parameter-space merging cannot express. Printed per run, from its results.json: the
target's held-out score (ja_math test), each source skill's retention (the evolved model's
ja_qa score over the Japanese source's, en_math over the math source's), and for natural
niches the archive's coverage of the fitness items (each item's best score among the
members, averaged) at the start and the end. Runs already in --root are read, not rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run(root: Path, seed: int, strategy: str, distractors: bool, generations: int, population: int) -> dict:
    out = root / f"{strategy}{'_pool' if distractors else ''}_seed{seed}"
    if not (out / "results.json").exists():
        command = [sys.executable, "-m", "jaxmerge.experiments.ja_math", "--seed", str(seed), "--strategy", strategy,
                   "--generations", str(generations), "--population", str(population), "--no-dfs", "--out", str(out)]
        subprocess.run(command + (["--distractors"] if distractors else []), check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def scores(results: dict) -> dict:
    rows = {r["kind"]: r for r in results["rows"] if r["kind"] == "evolved"}
    sources = {r["model"]: r["scores"] for r in results["rows"] if r["kind"] == "source"}
    evolved = rows["evolved"]["scores"]
    best_source = max(s["ja_math"] for s in sources.values())
    out = {"ja_math": evolved["ja_math"], "best source ja_math": best_source,
           "ja_qa kept": 100 * evolved["ja_qa"] / max(sources["japanese"]["ja_qa"], 1e-9),
           "en_math kept": 100 * evolved["en_math"] / max(sources["math"]["en_math"], 1e-9)}
    if "coverage" in results["search"]:
        coverage = results["search"]["coverage"]
        out["coverage"] = f"{100 * coverage[0]:.0f} -> {100 * coverage[-1]:.0f}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--generations", type=int, default=40)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--root", default="runs/niches_vs_cma")
    args = parser.parse_args()
    root = Path(args.root)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"ja_math toy, {args.generations} generations x {args.population} candidates each "
          f"({args.generations * args.population} evaluations on the fitness minibatch), no DFS\n")
    print("| sources | strategy | seed | ja_math (target) | best source's ja_math | ja_qa kept % | en_math kept % | "
          "archive coverage % (start -> end) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    summary = {}
    for distractors in (False, True):
        for strategy in ("cma_es", "natural_niches"):
            for seed in seeds:
                s = scores(run(root, seed, strategy, distractors, args.generations, args.population))
                summary.setdefault((distractors, strategy), []).append(s["ja_math"])
                print(f"| {'pool of 5' if distractors else 'two'} | {strategy} | {seed} | {s['ja_math']:.1f} | "
                      f"{s['best source ja_math']:.1f} | {s['ja_qa kept']:.0f} | {s['en_math kept']:.0f} | "
                      f"{s.get('coverage', '—')} |", flush=True)
    print("\nmean ja_math over seeds: " + "; ".join(
        f"{'pool' if d else 'two'} {name} {statistics.mean(v):.1f}" for (d, name), v in summary.items()))


if __name__ == "__main__":
    main()
