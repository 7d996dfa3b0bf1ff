"""`jaxmerge evolve CONFIG --dry-run`: what a run would do, checked, before a model is loaded.

It validates the configuration and the run directory, reads and renders every task (the
tokenizer and, for a VLM, its processor are the only model files read), and describes:
each task's first rendered prompts (chat template and few-shot examples included) and
answers, the split sizes, the test rows the search could have seen, references longer
than a response may be, the genome, and the memory per device of the configured layout
(`jaxmerge plan`'s estimate, from the checkpoints' config.json). Nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxmerge.checkpoint import load_tokenizer, model_config, read_config
from jaxmerge.generation import language_config
from jaxmerge.hub import hub_models
from jaxmerge.parallel import DEVICE_MEMORY_GIB
from jaxmerge.pipeline.checks import (
    describe_long_references,
    describe_overlap,
    drop_overlap,
    long_references,
    split_overlap,
)
from jaxmerge.pipeline.config import EvolveConfig, resolve_config, validate
from jaxmerge.pipeline.problem import genome_space, prepare_tasks
from jaxmerge.pipeline.rundir import fingerprint_inputs, plan_run_dir
from jaxmerge.pipeline.sources import default_layout, processor_for, tokenizer_dir, vlm_index
from jaxmerge.search import default_population_size

SHOWN_CHARACTERS = 600  # of each prompt shown: its end, where the question is


def _shown(text: str) -> str:
    return repr(text if len(text) <= SHOWN_CHARACTERS else "..." + text[-SHOWN_CHARACTERS:])


def _device_kind() -> str:
    """The `jaxmerge plan` device kind of JAX's first device ("cpu" where it is not known)."""
    kind = jax.devices()[0].device_kind.lower()
    known = sorted(DEVICE_MEMORY_GIB, key=len, reverse=True)
    return next((k for k in known if k.split("-")[0] in kind.replace(" ", "")), "cpu")


def dry_run(config: EvolveConfig, rows: int = 2) -> str:
    """The report of what `evolve(config)` would do (see the module docstring), as text;
    `rows`: the rendered prompts shown per task. Raises what `evolve` would raise on bad input."""
    config = resolve_config(config)
    validate(config)
    record, inputs = config.record(), config.input_paths()
    run_dir = plan_run_dir(config.out, config.name, record, fingerprint_inputs(inputs), inputs,
                           hub_models=hub_models(config.genome.references))
    resumes = run_dir.is_dir() and (run_dir / "run.json").exists()
    lines = [f"dry run of {config.name}: nothing is loaded or written",
             f"run directory: {run_dir} ({'resumes the unfinished run there' if resumes else 'new'})"]

    tokenizer = load_tokenizer(tokenizer_dir(config))
    tasks = prepare_tasks(config, tokenizer, processor_for(config), dedupe=False)
    for task in tasks:
        lines += ["", f"task {task.name}: metric {task.spec.metric}"
                  + (f" ({task.spec.language}{', strict' if task.spec.language_strict else ''})"
                     if task.spec.language else "")
                  + ("" if task.spec.optimised else ", reported only (not optimised)")]
        overlap = split_overlap(task)
        if config.dedupe and overlap is not None and overlap["in_either"]:
            task = drop_overlap(task)
        sizes = ", ".join(f"{split} {len(data)}" for split in ("fitness", "validation", "test")
                          if (data := getattr(task, split)) is not None)
        lines.append(f"  rows: {sizes}")
        if overlap is not None:
            lines.append("  overlap: " + describe_overlap(overlap)
                         + ("; dropped (dedupe: true)" if config.dedupe and overlap["in_either"] else ""))
        long = long_references(task, tokenizer)
        if long is not None and long["longer"]:
            lines.append("  warning: " + describe_long_references(long))
        shown = task.fitness if task.fitness is not None else task.test
        for i in range(min(rows, len(shown))):
            lines += [f"  prompt {i} ({shown.where(i, 'fitness' if shown is task.fitness else 'test')}): "
                      f"{_shown(shown.prompts[i])}", f"    answer: {shown.answers[i]!r}"]
    for task in config.lm_eval_tasks:
        lines += ["", f"lm-eval task {task.task.name}: metric {task.task.metric}, {len(task.fitness)} fitness "
                  f"documents, {len(task.test_ids)} test documents"]

    genome = config.genome
    base = language_config(model_config(genome.base_model or genome.models[0]))
    space = genome_space(config, len(genome.models), base.num_layers)
    population = config.search.population or default_population_size(space.num_dims)
    lines += ["", f"genome: {genome.merge_method}, {space.num_dims} numbers ({', '.join(space.keys)} per source "
              f"and layer group; {space.num_groups} groups: {', '.join(space.group_labels())})",
              f"search: {config.search.strategy}, {config.search.generations} generations of {population} "
              f"candidates"]
    lines += ["", _memory(config, tasks, tokenizer, population)]
    return "\n".join(lines)


def _memory(config: EvolveConfig, tasks, tokenizer, population: int) -> str:
    """`jaxmerge plan`'s estimate for the configured layout on this machine's devices."""
    from jaxmerge.plan import PlanRequest, format_plan, plan

    layout = default_layout(config.layout)
    devices = layout.population * layout.model if layout is not None else 1
    prompts = [p for t in tasks for split in (t.fitness, t.validation) if split is not None for p in split.prompts]
    longest = max((len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]), default=1)
    new_tokens = max((t.spec.max_new_tokens for t in tasks if t.spec.generative), default=0)
    host = vlm_index(config)
    model = config.genome.models[host] if host is not None else config.genome.base_model or config.genome.models[0]
    on_device = config.genome.max_sources if config.search.sources_on_host else None
    dtype = config.genome.dtype or read_config(Path(model)).get("torch_dtype") or "float32"
    request = PlanRequest(model=model, sources=len(config.genome.models), on_device=on_device,
                          method=config.genome.merge_method, population=population,
                          batch=config.search.minibatch, seq_len=longest, new_tokens=new_tokens,
                          device=_device_kind(), devices=devices, dtype=dtype)
    if jax.device_count() < devices:
        return (f"memory: the layout needs {devices} devices and this machine has {jax.device_count()}; "
                f"`jaxmerge plan {model} --devices {devices}` estimates it")
    result = plan(request)
    chosen = [r for r in result["layouts"] if layout is None or r["layout"] == str(layout)]
    return "memory per device (jaxmerge plan's estimate, " + dtype + "):\n" + format_plan(
        {**result, "layouts": chosen, "chosen": chosen[0]["layout"] if chosen and chosen[0]["fits"] else None})
