"""The paper's first experiment: evolve a parameter-space merge of a Japanese model and a
math model into a Japanese math model. A configuration of `jaxmerge.evolve`.

    python -m jaxmerge.experiments.ja_math                    # the toy world, a few minutes on a CPU
    python -m jaxmerge.experiments.ja_math --seed 1 --out runs/ja_math-seed1

    python -m jaxmerge.experiments.ja_math \\                # the paper's setting
        --base mistralai/Mistral-7B-v0.1-dir \\
        --models shisa-gamma-7b-v1-dir WizardMath-7B-V1.1-dir Abel-7B-002-dir \\
        --fitness-set gsm8k_ja.jsonl --test-set mgsm_ja.jsonl

JSONL rows hold "question" and "answer" (a number). The last `--validation-size` fitness
rows are the validation split (the best candidate is chosen on it, as in the paper); the
test set is touched once, at the end. Everything lands in `--out` (default: a fresh
`runs/ja_math-<time>`): run.json, search/ (generations.jsonl, orbax checkpoints: rerun the
same command to resume), results.json/.md, fitness.png, genome.png, recipe.yml and
merged/ (an HF checkpoint that mergekit reproduces from recipe.yml).
"""

from __future__ import annotations

import argparse
import dataclasses

from jaxmerge.console import log_to_console
from jaxmerge.eval.data import DataSource
from jaxmerge.eval.prompts import PromptSpec
from jaxmerge.eval.tasks import TaskSpec
from jaxmerge.experiments import arguments
from jaxmerge.pipeline import EvolveConfig, GenomeConfig, evolve
from jaxmerge.testing import toy_world as tw

# A Japanese Alpaca-style chain-of-thought prompt, as in the paper's evaluation.
JA_PROMPT = ("以下に、あるタスクを説明する指示があります。"
             "リクエストを適切に完了するための回答を日本語で記述してください。"
             "一歩一歩考えましょう。\n\n### 指示:\n{question}\n\n### 応答:\n")


def real_tasks(args: argparse.Namespace) -> tuple[TaskSpec, ...]:
    # language_strict: the paper's MGSM-ja rule, a bare number is not an answer in Japanese.
    return (TaskSpec("ja_math", metric="number", language="japanese", language_strict=True,
                     fitness=DataSource(args.fitness_set),
                     test=DataSource(args.test_set), prompt=PromptSpec(template=args.prompt_template),
                     max_new_tokens=args.max_new_tokens or 512),)


def config_from_args(args: argparse.Namespace) -> EvolveConfig:
    real = bool(args.models)
    if real:
        genome = GenomeConfig(models=tuple(args.models), base_model=args.base, merge_method=args.method,
                              layer_groups=args.layer_groups or 1, dtype=args.dtype)
        tasks = real_tasks(args)
    else:
        world = tw.world_dir(args.seed)
        names = ("japanese", "math") + (tw.DISTRACTORS if args.distractors else ())
        models = [world / "japanese", world / "math"]
        if args.distractors:
            models += [tw.distractors_dir(args.seed) / name for name in tw.DISTRACTORS]
        genome = GenomeConfig(models=tuple(map(str, models)), base_model=str(world / "base"),
                              merge_method=args.method, layer_groups=args.layer_groups or tw.MODEL.num_layers,
                              names=names, dtype=args.dtype,
                              gates=args.distractors and args.strategy != "natural_niches",  # an archive has no gates
                              source_cost=args.source_cost, max_sources=args.max_sources)
        tasks = tw.tasks(args.seed, args.test_size, skills_share(args), args.fitness == "loglik")
    config = arguments.evolve_config(args, "ja_math", genome, tasks, real, args.minibatch or (200 if real else 64))
    if args.guard:
        config = dataclasses.replace(config, search=dataclasses.replace(
            config.search, guards=tuple((t.name, args.guard) for t in tasks if t.name in ("ja_qa", "en_math"))))
    if args.sources_on_host:
        config = dataclasses.replace(config, search=dataclasses.replace(config.search, sources_on_host=True))
    return config


def skills_share(args: argparse.Namespace) -> float:
    """The sources' own tasks' share of the fitness rows: --keep-skills, or 0.5 where they are
    objectives (--strategy nsga2) or guards (--guard)."""
    if args.keep_skills or not (args.strategy == "nsga2" or args.guard):
        return args.keep_skills
    return 0.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxmerge.experiments.ja_math", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_search_arguments(parser, "ja_math")
    arguments.add_dfs_arguments(parser)
    parser.add_argument("--keep-skills", type=float, default=0.0, metavar="FRACTION",
                        help="share of each fitness minibatch drawn from the sources' own tasks (toy: Japanese "
                        "QA and English math), so the merge keeps them; 0 (the paper): the target task only")
    parser.add_argument("--fitness", choices=("number", "loglik"), default="number",
                        help="the toy target's fitness: the generated answer's number (default), or the reference "
                        "answer's log-likelihood (no generation in the search; the test still generates)")
    parser.add_argument("--guard", type=float, metavar="FRACTION",
                        help="keep each source's own skill (toy: Japanese QA, English math) at FRACTION of the best "
                        "source's validation score while the target goes as high as it can (a constrained search; "
                        "`--strategy nsga2` lays out the whole trade-off instead)")
    parser.add_argument("--distractors", action="store_true",
                        help="a pool of five sources: the two useful ones and three distractors (fine-tunes on "
                        "stories and statements, a noisy copy of the base; built once), with a gate gene per "
                        "source: the search chooses which enter the merge")
    parser.add_argument("--source-cost", type=float, default=0.0, metavar="COST",
                        help="with --distractors: fitness each source in the merge costs (e.g. 0.01, a point of "
                        "accuracy), so that of two merges scoring alike the one with fewer sources wins")
    parser.add_argument("--max-sources", type=int, metavar="K",
                        help="with --distractors: at most K sources in a merge (the highest open gates)")
    parser.add_argument("--sources-on-host", action="store_true",
                        help="with --max-sources: the pool in host memory, each candidate's K sources on the device "
                        "when it is scored (for pools larger than the accelerator)")
    parser.add_argument("--dtype", default=None, help="load dtype (default: as stored)")
    real = parser.add_argument_group("real checkpoints (the paper's setting)")
    real.add_argument("--models", nargs="+", help="source checkpoints (fine-tunes of --base)")
    real.add_argument("--base", help="the common base checkpoint")
    real.add_argument("--fitness-set", help="JSONL: question, answer (e.g. translated GSM8K)")
    real.add_argument("--test-set", help="JSONL: question, answer (e.g. MGSM-JA)")
    real.add_argument("--prompt-template", default=JA_PROMPT, help="with {question}")
    real.add_argument("--validation-size", type=int, default=200)
    real.add_argument("--minibatch", type=int, help="fitness problems per generation (default 200)")
    real.add_argument("--max-new-tokens", type=int)
    args = parser.parse_args(argv)
    if args.models and not (args.base and args.fitness_set and args.test_set):
        parser.error("--models needs --base, --fitness-set and --test-set")
    if (args.source_cost or args.max_sources) and not args.distractors:
        parser.error("--source-cost and --max-sources act on the gated sources of --distractors' pool: add "
                     "--distractors")
    if args.sources_on_host and not args.max_sources:
        parser.error("--sources-on-host puts one candidate's sources on the device at a time: give --max-sources")
    if args.models and (args.keep_skills or args.guard or args.strategy == "nsga2" or args.distractors
                        or args.fitness != "number"):
        parser.error("--keep-skills, --guard, --distractors, --fitness and --strategy nsga2 are toy-world options "
                     "(with real checkpoints, write a config: tasks as objectives or guards, genome.gates; see "
                     "`jaxmerge evolve`)")
    return args


def main(argv=None) -> dict:
    log_to_console()
    return evolve(config_from_args(parse_args(argv))).results


if __name__ == "__main__":
    main()
