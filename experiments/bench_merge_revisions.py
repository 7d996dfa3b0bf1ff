"""`jaxmerge merge` at two git revisions, side by side: did a change make the streamed merge
slower or larger? (Issue #27's "at or below its current time and memory".)

Each revision is checked out once into a temporary worktree; every round runs, for each
recipe, the revisions' `jaxmerge merge` one after the other (whole processes, the XLA
cache warm after a first round that is not counted), so that the machine's load falls on
both alike. Prints min and median wall time and the peak RSS of each, and the ratio of the
second revision to the first. The models are three Mistral-shaped bf16 checkpoints (a base
and two fine-tunes) written by bench_merge.py; FLAGS are passed to the second revision only
(e.g. --compute-dtype float32).

    python experiments/bench_merge_revisions.py 16b9104 HEAD [--size 300M] [--rounds 3] [--flags ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench_merge import METHODS, RECIPE, SIZES, write_family

ROOT = Path(__file__).resolve().parents[1]


def worktree(revision: str, into: Path) -> Path:
    """The revision's files in a detached worktree at `into`."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(into), revision],
                   check=True, capture_output=True)
    return into


def merge_once(tree: Path, recipe: Path, out: Path, flags: list[str]) -> tuple[float, float]:
    """One whole `jaxmerge merge` process of `tree`'s code: (seconds, peak RSS in GB)."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "jaxmerge.cli", "merge", str(recipe), str(out), *flags],
                               cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"jaxmerge merge at {tree} failed: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", help="the reference revision (e.g. the commit before a change)")
    parser.add_argument("second", help="the revision measured against it (e.g. HEAD)")
    parser.add_argument("--size", default="300M", choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=3, help="counted rounds (one more warms the XLA cache)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="jaxmerge merge flags for the second")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_merge_revisions_"))
    trees = {}
    try:
        for name in (args.first, args.second):
            trees[name] = worktree(name, scratch / f"tree{len(trees)}")
        (scratch / "models").mkdir()
        params = write_family(scratch / "models", args.size)
        print(f"jaxmerge merge, {params / 1e6:.0f}M-parameter bf16 base + 2 fine-tunes; {args.first} against "
              f"{args.second} {' '.join(args.flags)}; min / median of {args.rounds} alternating rounds, warm")
        runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_ in range(args.rounds + 1):
            for method in args.methods.split(","):
                density = ", density: 0.5" if method != "task_arithmetic" else ""
                recipe = scratch / f"{method}.yml"
                recipe.write_text(textwrap.dedent(RECIPE.format(method=method, root=scratch / "models",
                                                                density0=density, density1=density)))
                for name, tree in trees.items():
                    result = merge_once(tree, recipe, scratch / "out", args.flags if name == args.second else [])
                    if round_:  # round 0 fills the XLA cache
                        runs.setdefault((method, name), []).append(result)
        print(f"{'recipe':17}{'revision':>12}{'min':>9}{'median':>9}{'peak RSS':>10}{'ratio (min)':>13}")
        for method in args.methods.split(","):
            reference = min(t for t, _ in runs[(method, args.first)])
            for name in trees:
                times = [t for t, _ in runs[(method, name)]]
                rss = min(r for _, r in runs[(method, name)])
                print(f"{method:17}{name[:12]:>12}{min(times):8.2f}s{statistics.median(times):8.2f}s"
                      f"{rss:8.2f}GB{min(times) / reference:12.2f}x")
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
