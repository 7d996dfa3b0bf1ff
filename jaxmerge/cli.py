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
    batch = tokenizer(args.prompt, return_tensors="np", padding=True)
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


def _merge(args) -> None:
    from jaxmerge.merge.recipe import merge_from_yaml

    out = merge_from_yaml(args.recipe, args.out, seed=args.seed, overwrite=args.overwrite,
                          shard_size=args.shard_size, allow_non_finite=args.allow_non_finite)
    print(f"wrote {out}")


def _evolve(args) -> None:
    from jaxmerge.pipeline import evolve, load_config

    overrides = list(args.set or [])
    for key, value in (("out", args.out), ("search.seed", args.seed), ("search.generations", args.generations),
                       ("layout", args.layout)):
        if value is not None:
            overrides.append(f"{key}={value}")
    config = load_config(args.config, overrides)  # every error in the file, before anything is loaded
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
    merge.add_argument("recipe", help="mergekit YAML (merge_method, base_model, models or slices, ...)")
    merge.add_argument("out")
    merge.add_argument("--seed", type=int, default=0, help="PRNG seed for DARE / DELLA")
    merge.add_argument("--shard-size", default="5GB")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--allow-non-finite", action="store_true",
                       help="merge input tensors holding NaN or Inf (refused by default, naming file and tensor)")
    merge.set_defaults(run=_merge)

    generate = commands.add_parser("generate", help="greedy generation from prompts")
    generate.add_argument("model")
    generate.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--dtype", default=None)
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
    except KeyboardInterrupt:  # temporaries are removed where they are made; no traceback
        print(f"jaxmerge {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
