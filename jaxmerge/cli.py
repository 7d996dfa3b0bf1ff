"""The `jaxmerge` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jaxmerge.console import log_to_console
from jaxmerge.errors import CheckpointError


def _info(args) -> None:
    import jax
    from flax import nnx

    from jaxmerge.architectures import parameter_count
    from jaxmerge.checkpoint import load
    from jaxmerge.generation import text_config

    start = time.perf_counter()
    model = load(args.model, dtype=args.dtype)
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - start
    c = text_config(model)  # a VLM's or a layer path's language model config
    print(f"{args.model}: {model.origin.architecture}, {parameter_count(model) / 1e6:.2f}M parameters, "
          f"{model.dtype} (loaded in {seconds:.2f}s)")
    print(f"  layers {c.num_layers}, hidden {c.hidden_size}, mlp {c.intermediate_size}, vocab {c.vocab_size}")
    print(f"  heads {c.num_heads} (key/value heads {c.num_kv_heads}, head dim {c.head_dim}), "
          f"sliding window {c.sliding_window}, tied embeddings {c.tie_word_embeddings}")
    rope = f"  rope {c.rope.rope_type}, theta {c.rope.theta:g}"
    if c.rope_local is not None:
        rope += f" (global layers); {c.rope_local.rope_type}, theta {c.rope_local.theta:g} (local layers)"
    print(rope)
    if c.layer_types is not None:
        print(f"  layer types {', '.join('local' if s else 'global' for s in c.sliding_layers)}")
    print(f"  features: {', '.join(c.features) or 'none'}")


def _convert(args) -> None:
    from jaxmerge.checkpoint import check_no_symlink_loop, companion_files, load, resolve_dtype
    from jaxmerge.outputs import check_output_dir
    from jaxmerge.saving import parse_size, save

    # Everything checkable before the model is loaded: the paths, the output (never the input), dtype,
    # shard size, the tokenizer and generation files to copy.
    for path in (Path(args.model), Path(args.out)):
        check_no_symlink_loop(path)
    check_output_dir(Path(args.out), [Path(args.model)], args.overwrite)
    resolve_dtype(args.dtype)
    parse_size(args.shard_size)
    companion_files(Path(args.model))
    model = load(args.model)
    out = save(model, args.out, dtype=args.dtype, shard_size=args.shard_size, overwrite=args.overwrite)
    print(f"wrote {out}")


def _generate(args) -> None:
    from jaxmerge.checkpoint import load, load_tokenizer, model_config, resolve_dtype
    from jaxmerge.generation import check_length, generate, language_config

    # Everything checkable before the weights are loaded: config, dtype, tokenizer, prompts, lengths.
    config = language_config(model_config(args.model))
    resolve_dtype(args.dtype)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be at least 0, got {args.max_new_tokens}")
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = args.prompt
    if args.chat:  # each prompt as a user turn, the template's assistant turn opened
        if not tokenizer.chat_template:
            raise ValueError(f"--chat: {args.model}'s tokenizer has no chat template (tokenizer_config.json)")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    # a chat template writes its own special tokens
    batch = tokenizer(prompts, return_tensors="np", padding=True, add_special_tokens=not args.chat)
    for prompt, mask in zip(args.prompt, batch["attention_mask"], strict=True):
        if not mask.any():
            raise ValueError(f"--prompt {prompt!r}: no tokens")
    config.check_token_ids(batch["input_ids"], "the tokenized --prompt")
    check_length(config, batch["input_ids"].shape[1], args.max_new_tokens, "--max-new-tokens")
    model = load(args.model, dtype=args.dtype)
    tokens = generate(model, batch["input_ids"], args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      attention_mask=batch["attention_mask"])
    prompt_length = batch["input_ids"].shape[1]
    for prompt, row in zip(args.prompt, tokens.tolist(), strict=True):
        print(f"{prompt!r} -> {tokenizer.decode(row[prompt_length:], skip_special_tokens=True)!r}")


# mergekit-yaml 0.1.5's options (mergekit.options.MergeOptions) that change nothing here, and why.
_MERGEKIT_NOTES = {
    "cuda": "jaxmerge computes on JAX's default device ({backend})",
    "device": "jaxmerge computes on JAX's default device ({backend})",
    "low_cpu_memory": "jaxmerge streams tensor by tensor on JAX's default device ({backend})",
    "read_to_gpu": "jaxmerge reads tensors to JAX's default device ({backend})",
    "multi_gpu": "jaxmerge computes on JAX's default device ({backend})",
    "gpu_rich": "jaxmerge computes on JAX's default device ({backend})",
    "num_threads": "jaxmerge's reading, merging (XLA) and writing threads are its own",
    "lazy_unpickle": "jaxmerge reads safetensors tensor by tensor",
    "async_write": "jaxmerge writes each tensor as soon as it is merged",
    "write_threads": "jaxmerge writes with one writer thread of its own",
    "clone_tensors": "jaxmerge writes every tensor once: nothing to clone",
    "trust_remote_code": "jaxmerge runs no code from model repositories",
    "allow_crimes": "jaxmerge merges models of one architecture (others are refused)",
    "safe_serialization": "jaxmerge writes safetensors only",
    "lora_merge_cache": "jaxmerge does not apply LoRA adapters (model+lora references are refused)",
    "lora_merge_dtype": "jaxmerge does not apply LoRA adapters (model+lora references are refused)",
    "unsafe_truncate_embeddings": "jaxmerge fits every model's token rows to the base's (or tokenizer_source's), "
                                  "never to the smallest vocabulary",
    "write_model_card": "jaxmerge writes no README.md model card (mergekit_config.yml is written)",
}


def _mergekit_shard_size(value: str) -> int:
    """mergekit-yaml's --out-shard-size: bytes as an integer or with a decimal k, m or b suffix
    (mergekit.common.parse_kmb: 5B is 5 * 10^9)."""
    text = value.strip()
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size such as 5B, 500M or 1000000, got {value!r}")
    return int(digits) * scale


def _merge_notes(args) -> list[str]:
    """One line per mergekit-yaml option given that does not apply to jaxmerge."""
    import jax

    notes = []
    for name, why in _MERGEKIT_NOTES.items():
        value = getattr(args, name)
        if value is None or value is (name == "safe_serialization"):
            continue  # not given (safetensors: jaxmerge's way), or honoured (--no-write-model-card)
        flag = ("--no-" if value is False else "--") + name.replace("_", "-")
        notes.append(f"{flag}: accepted, changes nothing here: " + why.format(backend=jax.default_backend()))
    return notes


def _merge(args) -> None:
    import logging

    from jaxmerge.merge.recipe import merge_from_yaml

    if args.out_shard_size is not None and args.shard_size is not None:
        raise ValueError("give --shard-size or mergekit's --out-shard-size, not both")
    if args.verbosity > 1:  # mergekit-yaml's -v -v: debug records
        logging.getLogger("jaxmerge").setLevel(logging.DEBUG)
    log = logging.getLogger("jaxmerge.cli")
    for note in _merge_notes(args):
        log.info("note: %s", note)
    shard_size = args.out_shard_size or args.shard_size or "5GB"
    if str(args.recipe).endswith(".json"):  # a natural-niches run's provenance.json: its model re-derived
        from jaxmerge.pipeline.niches import merge_provenance

        print(f"wrote {merge_provenance(args.recipe, args.out, overwrite=args.overwrite)}")
        return
    cache = os.environ.get("HF_HUB_CACHE")
    if args.transformers_cache:  # mergekit's cache of downloaded models: the Hugging Face cache jaxmerge reads
        os.environ["HF_HUB_CACHE"] = args.transformers_cache
    try:
        out = merge_from_yaml(args.recipe, args.out, seed=args.seed, overwrite=args.overwrite, shard_size=shard_size,
                              allow_non_finite=args.allow_non_finite, progress=not args.quiet,
                              copy_tokenizer=args.copy_tokenizer, write_recipe=args.write_model_card is not False,
                              ties=args.ties, compute_dtype=args.compute_dtype)
    finally:  # the environment as it was (main() may run again in this process)
        if args.transformers_cache and cache is None:
            del os.environ["HF_HUB_CACHE"]
        elif args.transformers_cache:
            os.environ["HF_HUB_CACHE"] = cache
    print(f"wrote {out}")


def _add_mergekit_options(merge: argparse.ArgumentParser) -> None:
    """mergekit-yaml 0.1.5's options (mergekit/options.py), so that its command lines run here:
    those that apply are honoured, the others accepted with a note (`_MERGEKIT_NOTES`)."""
    group = merge.add_argument_group(
        "mergekit-yaml's options", "mergekit-yaml 0.1.5's command lines run here: --random-seed is --seed, and these "
        "are honoured; --cuda, --device, --low-cpu-memory, --read-to-gpu, --multi-gpu, --gpu-rich, --num-threads/-j, "
        "--lazy-unpickle, --async-write, --write-threads, --clone-tensors, --trust-remote-code, --allow-crimes, "
        "--[no-]safe-serialization, --lora-merge-cache, --lora-merge-dtype, --unsafe-truncate-embeddings are accepted "
        "with a note saying why they change nothing here")
    switch = argparse.BooleanOptionalAction
    group.add_argument("--copy-tokenizer", action=switch, default=True,
                       help="copy the tokenizer and generation files of the base (or first) model")
    group.add_argument("--write-model-card", action=switch, default=None,
                       help="--no-write-model-card: no mergekit_config.yml, as mergekit writes none (no README card "
                       "either way)")
    group.add_argument("--out-shard-size", type=_mergekit_shard_size, metavar="SIZE",
                       help="largest shard in bytes, mergekit's way (5B = 5 * 10^9); same as --shard-size")
    group.add_argument("--transformers-cache", metavar="DIR",
                       help="the Hugging Face cache Hub models are read from (HF_HUB_CACHE)")
    group.add_argument("--quiet", action=switch, default=False, help="no progress bar")
    group.add_argument("-v", "--verbosity", action="count", default=0, help="-v -v: debug records")
    for name in ("cuda", "low_cpu_memory", "read_to_gpu", "multi_gpu", "lazy_unpickle", "async_write",
                 "clone_tensors", "trust_remote_code", "allow_crimes", "unsafe_truncate_embeddings"):
        group.add_argument("--" + name.replace("_", "-"), action=switch, default=False, help=argparse.SUPPRESS)
    group.add_argument("--safe-serialization", action=switch, default=True, help=argparse.SUPPRESS)
    group.add_argument("--gpu-rich", action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--device", help=argparse.SUPPRESS)
    group.add_argument("--num-threads", "-j", type=int, help=argparse.SUPPRESS)
    group.add_argument("--write-threads", type=int, help=argparse.SUPPRESS)
    group.add_argument("--lora-merge-cache", help=argparse.SUPPRESS)
    group.add_argument("--lora-merge-dtype", help=argparse.SUPPRESS)


def _evolve(args) -> None:
    from jaxmerge.pipeline import evolve, load_config

    overrides = list(args.set or [])
    for key, value in (("out", args.out), ("search.seed", args.seed), ("search.generations", args.generations),
                       ("layout", args.layout)):
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_config(args.config, overrides)  # every error in the file, before anything is loaded
    if args.dry_run:
        from jaxmerge.pipeline.dry_run import dry_run

        print(dry_run(config, rows=args.show_rows))
        return
    from jaxmerge.search.evolution import sigterm_as_interrupt

    with sigterm_as_interrupt():  # SIGTERM stops the run as Ctrl-C does: last generation checkpointed, lock released
        evolve(config)


def _plan(args) -> None:
    import json

    from jaxmerge.plan import PlanRequest, devices_for_plan, format_plan, plan

    devices_for_plan(args.devices)  # host CPU devices to compile the layouts on (before JAX starts)
    result = plan(PlanRequest(model=args.model, sources=args.sources, on_device=args.on_device, method=args.method,
                              population=args.population, batch=args.batch, seq_len=args.seq_len,
                              new_tokens=args.new_tokens, device=args.device, devices=args.devices, dtype=args.dtype))
    print(format_plan(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _lm_eval(args) -> None:
    """lm-eval's own command line, with the `jaxmerge` model registered (lm-eval 0.4 finds no plugins)."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import jaxmerge.harness  # noqa: F401  (registers the model)
    except ImportError as e:
        raise ValueError(f"{e}; install the lm-eval extra: pip install 'jaxmerge[lm-eval]'") from None
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    saved = sys.argv
    sys.argv = ["lm-eval", *arguments]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxmerge", description="Evolutionary model merging in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="load a model directory and describe it")
    info.add_argument("model", help="Hugging Face model directory")
    info.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    info.set_defaults(run=_info)

    convert = commands.add_parser("convert", help="load a model and save it again (dtype, sharding)")
    convert.add_argument("model")
    convert.add_argument("out")
    convert.add_argument("--dtype", default=None)
    convert.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    convert.set_defaults(run=_convert)

    merge = commands.add_parser("merge", help="run a mergekit YAML recipe")
    merge.add_argument("recipe", help="mergekit YAML (merge_method, base_model, models or slices, ...), or a "
                       "natural-niches run's provenance.json (its best member re-derived from the sources)")
    merge.add_argument("out")
    merge.add_argument("--seed", "--random-seed", dest="seed", type=int,
                       help="seed of DARE / DELLA masks (default: the recipe's jaxmerge_seed, else 0)")
    merge.add_argument("--shard-size", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--allow-non-finite", action="store_true",
                       help="merge input tensors holding NaN or Inf (refused by default, naming file and tensor)")
    merge.add_argument("--ties", choices=("index", "torch"), default="index",
                       help="which of the entries tied at a TIES / breadcrumbs cut are kept (as many as mergekit "
                       "keeps either way): index, the first in the checkpoint's flat order (fast; what a search's "
                       "merges keep, so an exported recipe rebuilds them); torch, those mergekit keeps on a CPU "
                       "(its torch sort replayed: mergekit's bits, slower in half precision)")
    merge.add_argument("--compute-dtype", choices=("float32",), default=None,
                       help="float32: compute in float32 and round once to the recipe's dtype (more accurate than "
                       "mergekit, whose `dtype:` rounds every step; by default jaxmerge computes as mergekit does)")
    _add_mergekit_options(merge)
    merge.set_defaults(run=_merge)

    generate = commands.add_parser("generate", help="greedy generation from prompts")
    generate.add_argument("model")
    generate.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--dtype", default=None)
    generate.add_argument("--chat", action="store_true",
                          help="each prompt as a user message in the tokenizer's chat template")
    generate.set_defaults(run=_generate)

    evolve = commands.add_parser("evolve", help="evolve a merge from a config file (see the README's 'Evolve your "
                                 "own merge')")
    evolve.add_argument("config", help="YAML: genome (mergekit-evolve's keys), tasks, search, dfs, layout")
    evolve.add_argument("--out", help="run directory (default: a fresh runs/<name>-<time>; the same one resumes)")
    evolve.add_argument("--seed", type=int, help="search.seed")
    evolve.add_argument("--generations", type=int, help="search.generations")
    evolve.add_argument("--layout", metavar="POPULATIONxMODEL", help="devices (see `jaxmerge plan`)")
    evolve.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override any config value, e.g. --set dfs.mode=off --set tasks[0].weight=2")
    evolve.add_argument("--dry-run", action="store_true",
                        help="check everything and print each task's rendered prompts, split sizes, overlaps, the "
                        "genome and the memory per device; load no model, write nothing")
    evolve.add_argument("--show-rows", type=int, default=2, metavar="N", help="--dry-run: prompts shown per task")
    evolve.set_defaults(run=_evolve)

    lm_eval = commands.add_parser("lm-eval", help="lm-evaluation-harness with the jaxmerge model: "
                                  "jaxmerge lm-eval --model jaxmerge --model_args pretrained=DIR --tasks ...",
                                  add_help=False)
    lm_eval.add_argument("arguments", nargs=argparse.REMAINDER, help="lm-eval's arguments (see lm-eval --help)")
    lm_eval.set_defaults(run=_lm_eval)

    from jaxmerge.parallel import DEVICE_MEMORY_GIB

    plan = commands.add_parser("plan", help="per-device memory of a merge search and the device layout that fits "
                               "(no weights loaded)")
    plan.add_argument("model", help="mistral-7b, llava-v1.6-mistral-7b, or a model directory (config.json only)")
    plan.add_argument("--sources", type=int, default=3, help="models merged besides the base")
    plan.add_argument("--on-device", type=int, metavar="K",
                      help="sources on the device at a time: a pool kept in host memory (search.sources_on_host, "
                      "genome.max_sources: K); default: every source on the device")
    plan.add_argument("--method", default="dare_ties")
    plan.add_argument("--population", type=int, default=128)
    plan.add_argument("--batch", type=int, default=8, help="prompts evaluated at once per candidate")
    plan.add_argument("--seq-len", type=int, default=512, help="prompt tokens (image tokens included)")
    plan.add_argument("--new-tokens", type=int, default=512)
    plan.add_argument("--device", default="v5e", choices=sorted(DEVICE_MEMORY_GIB),
                      help="device kind (its memory per device); TPU v4 and v5e count one device per chip")
    plan.add_argument("--devices", type=int, default=8, help="devices in all hosts (v4-8: 4, v5e-8: 8)")
    plan.add_argument("--dtype", default="bfloat16")
    plan.add_argument("--json", help="also write the plan as JSON here")
    plan.set_defaults(run=_plan)
    return parser


def enable_compilation_cache() -> None:
    """Keep compiled XLA programs on disk across runs (a repeated merge or experiment of
    the same shapes skips compilation). JAXMERGE_CACHE_DIR moves it; "off" disables it."""
    location = os.environ.get("JAXMERGE_CACHE_DIR", str(Path.home() / ".cache" / "jaxmerge" / "xla"))
    if location.lower() == "off":
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", location)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _error_message(error: Exception) -> str:
    """One line: what failed and where (a file's name, not a traceback)."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's (argparse would read its flags as ours)
        args = argparse.Namespace(command="lm-eval", arguments=argv[1:], run=_lm_eval)
    else:
        args = build_parser().parse_args(argv)
    log_to_console()
    enable_compilation_cache()
    try:
        args.run(args)
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        print(f"jaxmerge {args.command}: error: {_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during evolve (Terminated); temporaries removed; no traceback
        signum = getattr(e, "signum", None)
        print(f"jaxmerge {args.command}: {'terminated' if signum else 'interrupted'}", file=sys.stderr)
        return 128 + signum if signum else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
