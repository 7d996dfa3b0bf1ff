"""The paper's first experiment: evolve a parameter-space merge of a Japanese model and a
math model into a Japanese math model.

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
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

import jaxmerge
from jaxmerge.experiments import common
from jaxmerge.experiments import toy_world as tw
from jaxmerge.merge import (broadcast_params, flat_params, merge_params, prepare, stack_sources,
                            with_params)
from jaxmerge.parallel import is_primary
from jaxmerge.search import run_search
from jaxmerge.search.export import save_merged
from jaxmerge.search.fitness import TokenTable, mgsm_scores
from jaxmerge.search.report import plot_genome, plot_history

# A Japanese Alpaca-style chain-of-thought prompt, as in the paper's evaluation.
JA_PROMPT = ("以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための回答を日本語で記述してください。"
             "一歩一歩考えましょう。\n\n### 指示:\n{question}\n\n### 応答:\n")


@dataclasses.dataclass
class Setting:
    """Models and data of one experiment."""
    base: Path
    sources: list[Path]
    names: list[str]
    fitness: common.Task  # the target task's fitness split, minibatched for the search
    validation: common.Task
    skills: list[tuple[common.Task, common.Task]]  # the sources' own tasks (fitness, validation) splits
    tests: dict[str, common.Task]  # the target first, then the sources' own tasks
    max_new_tokens: int
    layer_groups: int
    minibatch: int


def _toy_tasks(seed: int, count: int, template, metric: str, name: str, exclude: set = frozenset()):
    """`count` distinct problems from a template, none of them in `exclude`."""
    rng = np.random.default_rng(seed)
    seen, prompts, answers = set(exclude), [], []
    while len(prompts) < count:
        prompt, answer = template(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        prompts.append(prompt)
        answers.append(answer.rstrip("こ") if metric != "exact" else answer)
    return common.Task(name, tuple(prompts), tuple(answers), metric)


def toy_setting(seed: int, layer_groups: int | None, test_size: int = 300) -> Setting:
    world = tw.world_dir(seed)
    fitness = _toy_tasks(10_000 + seed, 256, tw.japanese_math, "mgsm_ja", "fitness")
    validation = _toy_tasks(20_000 + seed, 128, tw.japanese_math, "mgsm_ja", "validation", set(fitness.prompts))
    held = set(fitness.prompts) | set(validation.prompts)
    tests = {"ja_math": _toy_tasks(30_000 + seed, test_size, tw.japanese_math, "mgsm_ja", "ja_math", held),
             "ja_qa": _toy_tasks(40_000 + seed, test_size, tw.japanese_qa, "exact", "ja_qa"),
             "en_math": _toy_tasks(50_000 + seed, test_size, tw.english_math, "mgsm", "en_math")}
    # The sources' own skills as number tasks ("<n>こ" is the number n, in Japanese).
    skills = [(_toy_tasks(60_000 + seed + i, 256, template, metric, name),
               _toy_tasks(70_000 + seed + i, 128, template, metric, name))
              for i, (template, metric, name) in enumerate(((tw.japanese_qa, "mgsm_ja", "ja_qa"),
                                                            (tw.english_math, "mgsm", "en_math")))]
    return Setting(world / "base", [world / "japanese", world / "math"], ["japanese", "math"], fitness, validation,
                   skills, tests, max_new_tokens=4, layer_groups=layer_groups or tw.MODEL.num_layers, minibatch=64)


def real_setting(args) -> Setting:
    def task(path, name):
        rows = common.read_jsonl(path, ("question", "answer"))
        return common.Task(name, tuple(args.prompt_template.format(question=r["question"]) for r in rows),
                           tuple(str(r["answer"]) for r in rows), "mgsm_ja")
    fitness = task(args.fitness_set, "fitness")
    if len(fitness) <= args.validation_size:
        raise ValueError(f"{args.fitness_set}: {len(fitness)} rows, not more than --validation-size "
                         f"{args.validation_size}")
    split = len(fitness) - args.validation_size
    validation = dataclasses.replace(fitness.rows(split, len(fitness)), name="validation")
    fitness = fitness.rows(0, split)
    sources = [Path(m) for m in args.models]
    return Setting(Path(args.base), sources, [p.name for p in sources], fitness, validation, [],
                   {"ja_math": task(args.test_set, "ja_math")}, max_new_tokens=args.max_new_tokens or 512,
                   layer_groups=args.layer_groups or 1, minibatch=args.minibatch or 200)


def ps_builder(method: str, model):
    """build(params, data, key): the PS-merged model of decoded genome values."""
    def build(params, data, key):
        return with_params(model, merge_params(method, data["base"], data["sources"], params, stats=data["stats"],
                                               key=key))
    return build


def fitness_fn(build, table: TokenTable, eos: int, max_new_tokens: int):
    """score(params, data, batch, key): the built model's MGSM accuracy (with the Japanese
    check) on a minibatch, all inside jit. build(params, data, key) -> model: a PS merge
    or a layer path."""
    def score(params, data, batch, key):
        out = jaxmerge.generate(build(params, data, key), batch["ids"], max_new_tokens, eos_token_id=eos,
                                attention_mask=batch["mask"])
        responses = out[:, batch["ids"].shape[1]:]  # [B, max_new_tokens]
        return jnp.mean(mgsm_scores(responses, batch["answers"], table, jnp.asarray([eos]), batch["japanese"]))
    return score


def mixed_batches(tokenizer, target: common.Task, skills: list[common.Task], size: int,
                  skill_fraction: float) -> list[dict]:
    """Consecutive minibatches of `size` rows, all of one shape (one compilation):
    `skill_fraction` of each split evenly over the skill tasks, the rest from the target."""
    shares = [round(size * skill_fraction / len(skills)) for _ in skills] if skills and skill_fraction else []
    tasks, shares = [target, *skills[:len(shares)]], [size - sum(shares), *shares]
    count = max(1, min(len(t) // s for t, s in zip(tasks, shares)))
    length = max(len(ids) for t in tasks for ids in common.encode_ids(tokenizer, t.prompts))
    return [common.fitness_batch(tokenizer, [t.rows(b * s, (b + 1) * s) for t, s in zip(tasks, shares)], length)
            for b in range(count)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jaxmerge.experiments.ja_math", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_search_arguments(parser, "ja_math")
    common.add_dfs_arguments(parser)
    parser.add_argument("--keep-skills", type=float, default=0.0, metavar="FRACTION",
                        help="share of each fitness minibatch drawn from the sources' own tasks (toy: Japanese "
                        "QA and English math), so the merge keeps them; 0 (the paper): the target task only")
    real = parser.add_argument_group("real checkpoints (the paper's setting)")
    real.add_argument("--models", nargs="+", help="source checkpoints (fine-tunes of --base)")
    real.add_argument("--base", help="the common base checkpoint")
    real.add_argument("--fitness-set", help="JSONL: question, answer (e.g. translated GSM8K)")
    real.add_argument("--test-set", help="JSONL: question, answer (e.g. MGSM-JA)")
    real.add_argument("--prompt-template", default=JA_PROMPT, help="with {question}")
    real.add_argument("--validation-size", type=int, default=200)
    real.add_argument("--minibatch", type=int, help="fitness problems per generation (default 200)")
    real.add_argument("--max-new-tokens", type=int)
    real.add_argument("--dtype", default=None, help="load dtype (default: as stored)")
    args = parser.parse_args(argv)
    if args.models and not (args.base and args.fitness_set and args.test_set):
        parser.error("--models needs --base, --fitness-set and --test-set")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    run_dir, load, started = common.start_run(args, "ja_math")
    setting = real_setting(args) if args.models else toy_setting(args.seed, args.layer_groups, args.test_size)
    tokenizer = AutoTokenizer.from_pretrained(setting.base)
    eos = tokenizer.eos_token_id
    base_model = load(setting.base)
    source_models = [load(p) for p in setting.sources]
    base = flat_params(base_model)
    sources = stack_sources(base, [flat_params(m) for m in source_models])
    paths = sorted(base)
    key = jax.random.key(args.seed)

    def merged_model(method, **values):
        params = broadcast_params(method, base, len(source_models), **values)
        return with_params(base_model, merge_params(method, base, sources, params, key=key))

    rows = []

    def add_row(name, kind, model):
        began = time.perf_counter()
        scores, samples = common.evaluate(model, tokenizer, setting.tests, setting.max_new_tokens)
        rows.append({"model": name, "kind": kind, "scores": scores, "samples": samples})
        print(f"  {name:36} " + "  ".join(f"{t} {v:5.1f}" for t, v in scores.items())
              + f"   ({time.perf_counter() - began:.0f} s)")

    print("scoring the sources and hand-set merges on the test sets:")
    for name, model in zip(setting.names, source_models):
        add_row(name, "source", model)
    add_row("base", "base", base_model)
    target = next(iter(setting.tests))
    for name, value in common.number_baselines(setting.tests[target], setting.fitness).items():
        rows.append({"model": name, "kind": "trivial", "scores": {target: value}})
    add_row("TIES (unoptimised: weight 1, density 0.5)", "merge", merged_model("ties", weight=1.0, density=0.5))
    add_row("DARE-TIES (hand-set: weight 1, density 0.5)", "merge",
            merged_model("dare_ties", weight=1.0, density=0.5))

    space, config = common.search_space(args, len(source_models), base_model.config.num_layers,
                                        setting.layer_groups, real=bool(args.models))
    table = TokenTable.from_tokenizer(tokenizer)
    score = fitness_fn(ps_builder(args.method, base_model), table, eos, setting.max_new_tokens)
    data = {"base": base, "sources": sources, "stats": prepare(args.method, base, sources)}
    if args.keep_skills and not setting.skills:
        raise ValueError("--keep-skills needs the sources' own tasks: only the toy world has them so far")
    batches = mixed_batches(tokenizer, setting.fitness, [f for f, _ in setting.skills], setting.minibatch,
                            args.keep_skills)
    validation = mixed_batches(tokenizer, setting.validation, [v for _, v in setting.skills],
                               len(setting.validation), args.keep_skills)[0]
    print(f"evolving {args.method} ({space.num_dims} numbers: {', '.join(space.evolve)} per source and layer group) "
          f"with {args.strategy}, {args.generations} generations:")
    began = time.perf_counter()
    result = run_search(space, paths, score, data, batches, validation, config=config, out_dir=run_dir / "search")
    search = common.search_summary(space, config, result, time.perf_counter() - began)

    merged_dir = run_dir / "merged"  # replaced whole if a resumed run had written it
    save_merged(space, result.best_genome, base_model, source_models, merged_dir, base_path=str(setting.base),
                source_paths=[str(p) for p in setting.sources], key=key, overwrite=True)
    if is_primary():
        shutil.copy(merged_dir / "mergekit_config.yml", run_dir / "recipe.yml")
    add_row("evolved PS merge (CMA-ES)" if args.strategy == "cma_es" else f"evolved PS merge ({args.strategy})",
            "evolved", load(merged_dir))  # the checkpoint on disk is what is scored

    if is_primary():
        plot_history(result.history, run_dir / "fitness.png")
        plot_genome(space, result.best_genome, run_dir / "genome.png", setting.names)

    searches = {}
    if not args.no_dfs:
        # DFS: a path through the first two sources' layers (A: the first, whose embeddings
        # and head are used); then PS+DFS: A the evolved PS model, B the first source.
        def make_score(build):
            return fitness_fn(build, table, eos, setting.max_new_tokens)
        pools = {"dfs": ([source_models[0], source_models[1]], setting.names[:2]),
                 "ps_dfs": ([load(merged_dir), source_models[0]], ["PS merge", setting.names[0]])}
        for name, (models, names) in pools.items():
            out, searches[name] = common.evolve_path(
                args, name, models, names, make_score, batches, validation, run_dir, real=bool(args.models),
                text_model_type=common.model_type_of(models[0]), tokenizer_dir=models[0].origin.directory)
            add_row(common.PATH_ROW_LABELS[name], "evolved", load(out))
    results = {
        "experiment": "ja_math", "seed": args.seed, "setting": "real" if args.models else "toy",
        "base": str(setting.base), "sources": dict(zip(setting.names, map(str, setting.sources))),
        "splits": {"fitness": len(setting.fitness), "validation": len(setting.validation),
                   **{name: len(task) for name, task in setting.tests.items()}},
        "metrics": {name: task.metric for name, task in setting.tests.items()},
        "rows": rows,
        "search": search,
        **{f"search_{name}": summary for name, summary in searches.items()},
        "seconds": time.perf_counter() - started,
    }
    print(f"total {results['seconds']:.0f} s")
    markdown = common.write_results(run_dir, results, list(setting.tests))
    print("\n" + markdown + f"\n\nwrote {run_dir}")
    return results


if __name__ == "__main__":
    main()
