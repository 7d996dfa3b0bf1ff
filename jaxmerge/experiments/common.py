"""What the experiments share: run directories, prompt sets, generation, scoring and the
results table (printed, and saved as `results.json` and `results.md`)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import functools
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxmerge
from jaxmerge import metrics
from jaxmerge.merge import get_method
from jaxmerge.models.layer_path import compact_path, layer_pool, path_model, split_hops, with_hops
from jaxmerge.models.llava import anyres_feature_index
from jaxmerge.parallel import Layout, is_primary
from jaxmerge.search import GenomeSpace, SearchConfig, default_population_size, run_search
from jaxmerge.search.path_genome import PathSpace


def make_run_dir(out: str | None, experiment: str, arguments: dict) -> Path:
    """`out`, or a fresh `runs/<experiment>-<timestamp>`. A directory of an unfinished run
    with the same arguments is resumed; a finished run, or a directory holding anything
    else, is refused: runs are never overwritten."""
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path, n = Path("runs") / f"{experiment}-{stamp}", 1
        while path.exists():
            n += 1
            path = Path("runs") / f"{experiment}-{stamp}-{n}"
    else:
        path = Path(out)
    record = {"experiment": experiment, "arguments": arguments}
    if path.exists() and any(path.iterdir()):
        saved = path / "run.json"
        if (path / "results.json").exists():
            raise FileExistsError(f"{path} holds a finished run (results.json): choose a new --out")
        if not saved.exists() or json.loads(saved.read_text()) != record:
            raise FileExistsError(f"{path} is not empty and is not an unfinished run with these arguments: "
                                  "choose a new --out")
        return path  # resume
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_jsonl(path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file, each with `fields`; errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """An evaluation set: prompts, reference answers and how they are scored.
    metric: "mgsm_ja" (last number, Japanese response), "mgsm" (last number), "exact",
    "rouge_ja" (Japanese ROUGE-L, with exact match beside it). pixel_values: one image per
    prompt [B, C, H, W] for a VLM task, whose prompts hold the image tokens; for LLaVA-NeXT
    [B, P, C, H, W] (tiles zero-padded to one count) with image_sizes [B, 2]."""
    name: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    metric: str
    pixel_values: np.ndarray | None = None
    image_sizes: np.ndarray | None = None

    def __len__(self):
        return len(self.prompts)

    def rows(self, begin: int, end: int) -> "Task":
        def part(a):
            return None if a is None else a[begin:end]
        return dataclasses.replace(self, prompts=self.prompts[begin:end], answers=self.answers[begin:end],
                                   pixel_values=part(self.pixel_values), image_sizes=part(self.image_sizes))

    def scores(self, responses: list[str]) -> dict[str, float]:
        """{score name: value x 100}: `name`, and `name`_exact for ROUGE-L tasks."""
        def exact():
            return 100.0 * float(np.mean([metrics.exact_match(r, a) for r, a in zip(responses, self.answers)]))
        if self.metric == "exact":
            return {self.name: exact()}
        if self.metric == "rouge_ja":
            return {f"{self.name}_rouge_l": metrics.rouge_l_ja(responses, list(self.answers)),
                    f"{self.name}_exact": exact()}
        hits = [metrics.mgsm_correct(r, float(a), require_japanese=self.metric == "mgsm_ja")
                for r, a in zip(responses, self.answers)]
        return {self.name: 100.0 * float(np.mean(hits))}


def encode_ids(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt, starting with the tokenizer's BOS."""
    bos = tokenizer.bos_token_id
    encoded = [tokenizer(p).input_ids for p in prompts]
    if bos is not None:  # tokenizers without a BOS template (the toy's) get it here, as in training
        encoded = [t if t[:1] == [bos] else [bos] + t for t in encoded]
    return encoded


def encode_prompts(tokenizer, prompts, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids [B, T] and attention mask [B, T] (with the tokenizer's BOS)."""
    encoded = encode_ids(tokenizer, prompts)
    length = length or max(map(len, encoded))
    ids = np.full((len(encoded), length), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(encoded), length), np.int32)
    for row, tokens in enumerate(encoded):
        if len(tokens) > length:
            raise ValueError(f"prompt {row} has {len(tokens)} tokens, more than {length}")
        ids[row, length - len(tokens):] = tokens
        mask[row, length - len(tokens):] = 1
    return ids, mask


def encode_references(tokenizer, answers, length: int) -> np.ndarray:
    """[B, length]: each answer's ids, then EOS, then padding (for exact match in jit)."""
    out = np.full((len(answers), length), tokenizer.eos_token_id, np.int32)
    for row, answer in enumerate(answers):
        tokens = tokenizer(answer, add_special_tokens=False).input_ids[:length]
        out[row, :len(tokens)] = tokens
    return out


def fitness_batch(tokenizer, tasks, prompt_length: int | None = None) -> dict:
    """Number tasks as arrays for a jitted fitness: ids, mask, integer answers and whether
    each row needs a Japanese response. `tasks`: one Task or several (mixed rows)."""
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    for task in tasks:
        if task.metric not in ("mgsm", "mgsm_ja"):
            raise ValueError(f"task {task.name}: a fitness needs a number metric, not {task.metric!r}")
    ids, mask = encode_prompts(tokenizer, [p for t in tasks for p in t.prompts], prompt_length)
    answers = np.array([int(round(float(a))) for t in tasks for a in t.answers], np.int32)
    japanese = np.array([t.metric == "mgsm_ja" for t in tasks for _ in t.prompts])
    return {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask), "answers": jnp.asarray(answers),
            "japanese": jnp.asarray(japanese)}


def generate_texts(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 64,
                   pixel_values: np.ndarray | None = None, image_sizes: np.ndarray | None = None) -> list[str]:
    """Greedy responses, decoded without special tokens. pixel_values [B, C, H, W] (or
    LLaVA-NeXT's [B, P, C, H, W] with image_sizes [B, 2]): one image per prompt (for a VLM;
    each prompt holds its image tokens)."""
    responses = []
    ids, mask = encode_prompts(tokenizer, prompts)
    chunks = [slice(begin, begin + batch_size) for begin in range(0, len(prompts), batch_size)]
    layouts = [None] * len(chunks)
    if image_sizes is not None:  # LLaVA-NeXT: every chunk's feature layout padded to one length (one compile)
        layouts = [anyres_feature_index(model.config, image_sizes[c], pixel_values.shape[1]) for c in chunks]
        longest = max(len(f) for f in layouts)
        layouts = [np.pad(f, (0, longest - len(f))) for f in layouts]
    for chunk, layout in zip(chunks, layouts):
        images = None if pixel_values is None else pixel_values[chunk]
        out = jaxmerge.generate(model, ids[chunk], max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                attention_mask=mask[chunk], pad_token_id=tokenizer.pad_token_id or 0,
                                pixel_values=images, feature_index=layout)
        for row in np.asarray(out[:, ids.shape[1]:]):
            row = list(row)
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            responses.append(tokenizer.decode(row, skip_special_tokens=True))
    return responses


def evaluate(model, tokenizer, tasks: dict[str, Task], max_new_tokens: int) -> tuple[dict, dict]:
    """({score name: score}, {task: first responses}) for one model. A task with images
    needs a VLM; "rouge_ja" tasks also report exact match."""
    scores, samples = {}, {}
    for name, task in tasks.items():
        responses = generate_texts(model, tokenizer, task.prompts, max_new_tokens, pixel_values=task.pixel_values,
                                   image_sizes=task.image_sizes)
        scores.update(task.scores(responses))
        samples[name] = responses[:5]
    return scores, samples


def number_baselines(task: Task, fitness: Task) -> dict[str, float]:
    """Trivial answers to a number task, scored without the Japanese check (so they are
    upper bounds): the commonest fitness answer, and the first / last number in the prompt."""
    def numbers(prompt):
        return [m for m in metrics._NUMBER.findall(prompt)]
    commonest = max(sorted(set(fitness.answers)), key=fitness.answers.count)
    guesses = {f"always answer {commonest}": [commonest] * len(task),
               "copy the first number": [(numbers(p) or [""])[0] for p in task.prompts],
               "copy the last number": [(numbers(p) or [""])[-1] for p in task.prompts]}
    return {name: 100.0 * float(np.mean([metrics.mgsm_correct(g, float(a), require_japanese=False)
                                         for g, a in zip(values, task.answers)]))
            for name, values in guesses.items()}


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
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (run_dir / "results.md").write_text(f"# {results['experiment']}\n\n{table}\n")
    return table


# ----------------------------------------------------------------------------- the search part
# ja_math and ja_vlm evolve the same kind of genome with the same options and report it alike.


def add_search_arguments(parser, experiment: str, method_help: str = "merge operator to evolve (default: dare_ties)",
                         method_default: str | None = "dare_ties") -> None:
    parser.add_argument("--out", help=f"run directory (default: a fresh runs/{experiment}-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="toy world, data split and search seed")
    parser.add_argument("--generations", type=int, default=40)
    parser.add_argument("--population", type=int, help="default: 4 + floor(3 ln n)")
    parser.add_argument("--strategy", default="cma_es", choices=("cma_es", "sep_cma_es", "snes"))
    parser.add_argument("--method", default=method_default, help=method_help)
    parser.add_argument("--layer-groups", type=int, help="genome granularity (default: per layer on the toy, 1 "
                        "(one weight and density per model, the reported EvoLLM-JP recipe) on real models)")
    parser.add_argument("--initial-weight", type=float, default=None,
                        help="initial mixing weight (paper: 0.5; default 1.0 on the toy, see the README)")
    parser.add_argument("--test-size", type=int, default=300, help="toy test items per task")
    parser.add_argument("--chunk-size", type=int, help="candidates evaluated at once (default: all)")
    parser.add_argument("--layout", metavar="POPULATIONxMODEL",
                        help="devices: the population split over POPULATION devices, each model array over MODEL "
                        "(default: every device on the population axis; see `jaxmerge plan` for 7B models)")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-host run first (jax.distributed; TPU pods find each other)")


def search_space(args, num_sources: int, num_layers: int, layer_groups: int, real: bool):
    """(GenomeSpace, SearchConfig) from the arguments: the method's weight and density
    evolved, starting at --initial-weight (0.5 on real models as in the paper, 1.0 on the toy)."""
    initial_weight = args.initial_weight if args.initial_weight is not None else (0.5 if real else 1.0)
    evolve = tuple(p for p in ("weight", "density") if p in {q.name for q in get_method(args.method).parameters})
    space = GenomeSpace(args.method, num_sources=num_sources, num_layers=num_layers, evolve=evolve,
                        layer_groups=layer_groups,
                        initial_values=(("weight", initial_weight),) if "weight" in evolve else ())
    config = SearchConfig(generations=args.generations, strategy=args.strategy, population_size=args.population,
                          seed=args.seed, chunk_size=args.chunk_size, layout=default_layout(args))
    return space, config


def load_options(args) -> dict:
    """jaxmerge.load's keywords for the run: --dtype, and with a model axis in --layout the
    models load sharded over it (each host reading only its slices)."""
    layout = default_layout(args)
    return {"dtype": getattr(args, "dtype", None),
            "sharding": layout.mesh() if layout is not None and layout.model > 1 else None}


def default_layout(args) -> Layout | None:
    """--layout, or all devices on the population axis when there are several."""
    if args.layout is not None:
        return Layout.parse(args.layout)
    return Layout(jax.device_count(), 1) if jax.device_count() > 1 else None


def search_summary(space, config, result, seconds: float) -> dict:
    """What results.json says of the search, rates included (printed too)."""
    population = config.population_size or default_population_size(space.num_dims)
    done, spent = len(result.history), sum(h["seconds"] for h in result.history)
    summary = {**space.summary(), "strategy": config.strategy, "generations": config.generations,
               "population": population,
               "best_validation": 100 * result.best_validation, "genome": space.describe(result.best_genome),
               "seconds": seconds, "generations_per_minute": 60 * done / spent,
               "candidates_per_second": done * population / spent}
    print(f"\nsearch: {done} generations x {population} candidates in {spent:.0f} s "
          f"({summary['generations_per_minute']:.1f} generations/min, {summary['candidates_per_second']:.1f} "
          f"candidates/s, first generation's compile included); evolved {json.dumps(summary['genome'])}")
    return summary


# ----------------------------------------------------------------------------- the DFS part
# Data-flow-space merging evolves a layer path through two models' layers with the same
# search loop (run_search) and the experiment's own fitness, given a path model builder.


def add_dfs_arguments(parser) -> None:
    dfs = parser.add_argument_group("data-flow-space (DFS) and PS+DFS merging")
    dfs.add_argument("--no-dfs", action="store_true", help="skip the DFS and PS+DFS rows")
    dfs.add_argument("--dfs-generations", type=int,
                     help="generations of each DFS search (default: 100 on real models, as in the paper; 20 on the toy)")
    dfs.add_argument("--dfs-population", type=int,
                     help="candidates per DFS generation (default: 128 on real models, as in the paper; "
                     "4 + floor(3 ln n) on the toy)")
    dfs.add_argument("--dfs-repeats", type=int, default=3, help="r: the layer slots are the M layers r times")
    dfs.add_argument("--dfs-scales", default="matrix", choices=("matrix", "network", "none"),
                     help="input scales: an M x M matrix (paper), a small network of (i, j, hop), or none")
    dfs.add_argument("--dfs-off-init", type=float, default=None,
                     help="initial indicator of the slots off model A's first repetition (paper: 0, on with "
                     "probability 1/2; default -1/3 on the toy, 0 on real models)")


def dfs_space(args, layers: tuple[int, int], real: bool) -> tuple[PathSpace, SearchConfig]:
    off = args.dfs_off_init if args.dfs_off_init is not None else (0.0 if real else -1 / 3)
    space = PathSpace(layers, repeats=args.dfs_repeats, scales=args.dfs_scales, off_init=off)
    config = SearchConfig(generations=args.dfs_generations or (100 if real else 20), strategy=args.strategy,
                          population_size=args.dfs_population or (128 if real else None), seed=args.seed,
                          chunk_size=args.chunk_size or 1, layout=default_layout(args))
    return space, config


def model_type_of(model) -> str:
    """"mistral" or "llama": the layers' architecture, from where the model was loaded."""
    origin = getattr(model, "origin", None)
    return "llama" if origin is not None and origin.architecture.startswith("Llama") else "mistral"


PATH_ROW_LABELS = {"dfs": "evolved DFS merge (layer path)", "ps_dfs": "evolved PS+DFS merge"}


def evolve_path(args, name: str, models: list, names: list[str], make_score, batches: list, validation,
                run_dir: Path, real: bool, text_model_type: str, tokenizer_dir, wrap=None) -> tuple[Path, dict]:
    """DFS: a layer path through models[0]'s (A: embeddings, head, the path's ends) and
    models[1]'s layers, evolved with `run_search` on the experiment's fitness, saved to
    run_dir/merged_<name> (with its modeling file) and plotted (fitness_<name>.png,
    path_<name>.png). make_score(build) -> score(params, data, batch, key), where
    build(params, data, key) gives the model of a decoded genome: the path model, or
    wrap(path model) (a VLM whose language model it is). Returns (the saved directory,
    the search summary)."""
    from jaxmerge.search.report import plot_history, plot_path

    space, config = dfs_space(args, tuple(m.config.num_layers for m in models), real)
    model = path_model(models[0], layer_pool(models), space.num_hops, text_model_type)
    _, state, rebuild = split_hops(wrap(model) if wrap else model)

    def build(params, data, key):
        return rebuild(data["path_model"], params["layer"], params["scale"], params["valid"])

    print(f"evolving a layer path through {' and '.join(names)} ({space.num_dims} numbers: {space.num_slots} "
          f"slot indicators, {space.scales} scales) with {config.strategy}, {config.generations} generations:")
    began = time.perf_counter()
    result = run_search(space, (), make_score(build), {"path_model": state}, batches, validation,
                        config=config, out_dir=run_dir / f"search_{name}")
    summary = search_summary(space, config, result, time.perf_counter() - began)
    summary["path_names"] = [space.layer_name(i) for i, _ in summary["genome"]["path"]]
    hops = space.decode(jnp.asarray(result.best_genome))
    out = run_dir / f"merged_{name}"  # replaced whole if a resumed run had written it
    jaxmerge.save(compact_path(with_hops(model, hops["layer"], hops["scale"], hops["valid"])), out, overwrite=True,
                  architecture=f"LayerPath{text_model_type.capitalize()}ForCausalLM", tokenizer_dir=tokenizer_dir)
    if is_primary():
        plot_history(result.history, run_dir / f"fitness_{name}.png")
        plot_path(space, result.best_genome, run_dir / f"path_{name}.png", names)
    return out, summary


def start_run(args, experiment: str) -> tuple[Path, Callable, float]:
    """What every experiment does first: join a multi-host run if asked, make (or resume)
    the run directory, and a `load` that shards over the layout's model axis. Returns
    (run directory, load, start time)."""
    if args.distributed:
        from jaxmerge import parallel
        parallel.initialize()
    started = time.perf_counter()
    run_dir = make_run_dir(args.out, experiment, {k: v for k, v in vars(args).items() if k != "out"})
    print(f"run directory: {run_dir}")
    return run_dir, functools.partial(jaxmerge.load, **load_options(args)), started
