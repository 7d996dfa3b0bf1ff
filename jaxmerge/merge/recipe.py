"""mergekit YAML recipes: parse, resolve parameters per tensor and layer, merge, save.

Semantics follow mergekit: a recipe lists `models` (all layers) or `slices` (layer ranges,
stacked one after another: a frankenmerge with `passthrough`). A parameter is a number, a
gradient (a list interpolated over the layers of a slice, t = i / (n - 1)) or a list of
{filter, value} entries (the first whose filter is a substring of the tensor name wins).
Precedence: the source's own parameters, then the slice's, then the top level.
Embeddings, the final norm and the output head take the value at t = 0.
"""

from __future__ import annotations

import dataclasses
import tempfile
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml
from flax import nnx
from tqdm.auto import tqdm

from jaxmerge.architectures import architecture_by_name
from jaxmerge.checkpoint import check_output_dir, load, resolve_dtype, save
from jaxmerge.merge.methods import MergeMethod, Options, get_method
from jaxmerge.merge.tree import VOCAB_AXES, flat_params, is_stacked, merge_leaf, prepare, stack_sources, with_params
from jaxmerge.merge.vocab import align_embeddings, build_vocabulary, permutations

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "name"}
OPTION_KEYS = {"normalize", "rescale", "int8_mask"}


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the key at fault."""


@dataclasses.dataclass(frozen=True)
class Source:
    model: str
    layer_range: tuple[int, int] | None  # None: every layer
    parameters: dict


@dataclasses.dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    base_model: str | None
    parameters: dict


@dataclasses.dataclass(frozen=True)
class Recipe:
    method: MergeMethod
    base_model: str | None
    slices: tuple[Slice, ...]
    parameters: dict
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    text: str  # the YAML as given
    notes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- parsing


def _check_keys(mapping: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(mapping, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unsupported key(s) {', '.join(map(repr, unknown))} "
                          f"(supported: {', '.join(sorted(allowed))})")
    return mapping


def _model_path(value: Any, where: str) -> str:
    if isinstance(value, dict):
        _check_keys(value, {"model"}, where)
        value = value.get("model")
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{where}: expected a model path")
    if "+" in value:
        raise RecipeError(f"{where}: LoRA references ('model+lora') are not supported: {value!r}")
    return value


def _check_parameters(params: Any, method: MergeMethod, where: str) -> dict:
    if params is None:
        return {}
    allowed = {p.name for p in method.parameters} | OPTION_KEYS
    return _check_keys(params, allowed, f"{where}.parameters")


def parse_recipe(text: str, base_dir: Path | None = None) -> Recipe:
    """Parses mergekit YAML. Relative model paths are taken from `base_dir`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe is not valid YAML: {e}") from None
    raw = _check_keys(raw, TOP_LEVEL_KEYS, "recipe")
    if "merge_method" not in raw:
        raise RecipeError("recipe: missing key 'merge_method'")
    try:
        method = get_method(raw["merge_method"])
    except KeyError as e:
        raise RecipeError(f"recipe.merge_method: {e.args[0]}") from None

    def path(p: str) -> str:
        return str((base_dir / p) if base_dir is not None and not Path(p).is_absolute() else p)

    base = path(_model_path(raw["base_model"], "recipe.base_model")) if raw.get("base_model") else None
    if ("models" in raw) == ("slices" in raw):
        raise RecipeError("recipe: give exactly one of 'models' or 'slices'")
    if "models" in raw:
        sources = []
        for i, m in enumerate(raw["models"] or []):
            where = f"recipe.models[{i}]"
            m = _check_keys(m, {"model", "parameters"}, where)
            sources.append(Source(path(_model_path(m.get("model"), where)), None,
                                  _check_parameters(m.get("parameters"), method, where)))
        if base is not None and base not in [s.model for s in sources]:
            sources.append(Source(base, None, {}))  # mergekit adds the base as an input
        slices = [Slice(tuple(sources), None, {})]
    else:
        slices = []
        for i, s in enumerate(raw["slices"] or []):
            where = f"recipe.slices[{i}]"
            s = _check_keys(s, {"sources", "base_model", "parameters"}, where)
            sources = []
            for j, src in enumerate(s.get("sources") or []):
                w = f"{where}.sources[{j}]"
                src = _check_keys(src, {"model", "layer_range", "parameters"}, w)
                layer_range = src.get("layer_range")
                if (not isinstance(layer_range, (list, tuple)) or len(layer_range) != 2
                        or not all(isinstance(x, int) for x in layer_range) or layer_range[0] >= layer_range[1]):
                    raise RecipeError(f"{w}.layer_range: expected [start, end) with start < end")
                sources.append(Source(path(_model_path(src.get("model"), w)), tuple(layer_range),
                                      _check_parameters(src.get("parameters"), method, w)))
            if not sources:
                raise RecipeError(f"{where}.sources: empty")
            lengths = {s_.layer_range[1] - s_.layer_range[0] for s_ in sources}
            if len(lengths) > 1:
                raise RecipeError(f"{where}: all sources of a slice must span the same number of layers")
            slice_base = path(_model_path(s["base_model"], f"{where}.base_model")) if s.get("base_model") else None
            slices.append(Slice(tuple(sources), slice_base, _check_parameters(s.get("parameters"), method, where)))
        if not slices:
            raise RecipeError("recipe.slices: empty")

    notes = []
    top = _check_parameters(raw.get("parameters"), method, "recipe")
    if any("int8_mask" in d for d in [top] + [s.parameters for s in slices]):
        notes.append("int8_mask is accepted and ignored: masks here are never materialised per source")
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source not in (None, "base") and not isinstance(tokenizer_source, str):
        raise RecipeError("recipe.tokenizer_source: expected 'base', 'union' or a model path")
    if tokenizer_source not in (None, "base", "union"):
        tokenizer_source = path(tokenizer_source)
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None:
            try:
                resolve_dtype(str(raw[key]).removeprefix("torch."))
            except ValueError as e:
                raise RecipeError(f"recipe.{key}: {e}") from None
    return Recipe(method, base, tuple(slices), top, raw.get("dtype"), raw.get("out_dtype"),
                  tokenizer_source, text, tuple(notes))


# ----------------------------------------------------------------------------- parameters


def evaluate_setting(setting: Any, tensor_name: str, t: float, where: str) -> Any:
    """A parameter's value for one tensor at relative depth t, or None if no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (bool, int, float)) for v in setting):
            if any(isinstance(v, bool) for v in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for entry in setting:
            if not isinstance(entry, dict) or "value" not in entry or set(entry) - {"filter", "value"}:
                raise RecipeError(f"{where}: expected a list of {{filter, value}} entries, got {entry!r}")
            f = entry.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate_setting(entry["value"], tensor_name, t, where)
        return None
    raise RecipeError(f"{where}: unexpected value {setting!r}")


def _resolve(name: str, scopes: list[tuple[str, dict]], tensor_name: str, t: float, default, required_for: str):
    for where, params in scopes:
        if name in params:
            value = evaluate_setting(params[name], tensor_name, t, f"{where}.parameters.{name}")
            if value is not None:
                return value
    if default is None:
        raise RecipeError(f"missing parameter {name!r} for {required_for} (tensor {tensor_name})")
    return default


def _options(recipe: Recipe, slice_: Slice) -> Options:
    scopes = [("slice", slice_.parameters), ("recipe", recipe.parameters)]
    defaults = recipe.method.default_options
    normalize = _resolve("normalize", scopes, "", 0.0, defaults.normalize, "the merge")
    rescale = _resolve("rescale", scopes, "", 0.0, defaults.rescale is not None, "the merge")
    return dataclasses.replace(defaults, normalize=bool(normalize), rescale="l1" if rescale else None)


# ----------------------------------------------------------------------------- running


def _slice_layers(flat: dict, layer_range: tuple[int, int] | None) -> dict:
    if layer_range is None:
        return flat
    start, end = layer_range
    return {p: (v[start:end] if is_stacked(p) else v) for p, v in flat.items()}


def _tensor_names(arch, path: str, num_layers: int) -> list[str]:
    parts = tuple(path.split("."))
    return arch.checkpoint_keys(parts, num_layers if is_stacked(path) else None)


def _merge_group(recipe: Recipe, slice_: Slice, models: dict, arch, paths: list[str], key, bar) -> dict:
    """Merges the given parameter paths of one slice."""
    method = recipe.method
    base_name = slice_.base_model or recipe.base_model
    if method.base == "required":
        if base_name is None:
            raise RecipeError(f"recipe: {method.name} needs a base_model")
        if base_name not in [s.model for s in slice_.sources]:
            raise RecipeError(f"recipe: base_model {base_name} is not among the slice's sources")
    inputs = [s for s in slice_.sources if not (method.base == "required" and s.model == base_name)]
    if not method.min_sources <= len(inputs) <= (method.max_sources or len(inputs)):
        lo, hi = method.min_sources, method.max_sources
        wanted = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi else f"at least {lo}")
        raise RecipeError(f"recipe: {method.name} takes {wanted} model(s) besides the base, got {len(inputs)}")
    base_source = next((s for s in slice_.sources if s.model == base_name), None)
    base_source = base_source if method.base == "required" else inputs[0]

    def view(source: Source) -> dict:
        flat = _slice_layers(models[source.model], source.layer_range)
        return {p: flat[p] for p in paths}

    base = view(base_source)
    views = [view(s) for s in inputs]
    for path in paths:  # shapes must agree, except for the vocabulary rows of embeddings
        for source, flat in zip(inputs, views):
            if flat[path].shape != base[path].shape and path not in VOCAB_AXES:
                name = _tensor_names(arch, path, 1 if is_stacked(path) else 0)[0]
                raise RecipeError(f"tensor {name}: {source.model} has shape {tuple(flat[path].shape)}, "
                                  f"{base_source.model} {tuple(base[path].shape)} (layers stacked first)")
    sources = stack_sources(base, views)
    options = _options(recipe, slice_)
    merged = {}
    for i, path in enumerate(paths):
        num_layers = base[path].shape[0] if is_stacked(path) else 1
        names = _tensor_names(arch, path, num_layers)
        ts = [i_ / (num_layers - 1) if num_layers > 1 else 1.0 for i_ in range(num_layers)] \
            if is_stacked(path) else [0.0]
        params = {}
        for p in method.parameters:
            if p.per_source:
                values = [[_resolve(p.name, [("source", s.parameters), ("slice", slice_.parameters),
                                             ("recipe", recipe.parameters)], name, t, p.default, s.model)
                           for name, t in zip(names, ts)] for s in inputs]
            else:
                values = [_resolve(p.name, [("slice", slice_.parameters), ("recipe", recipe.parameters)],
                                   name, t, p.default, "the merge") for name, t in zip(names, ts)]
            array = jnp.asarray(values, jnp.float32)
            params[p.name] = array if is_stacked(path) else array[..., 0]
        leaf_key = None if key is None else jax.random.fold_in(key, zlib.crc32(path.encode()))
        # A one-off merge needs no sorted statistics (thresholds come from a bisection);
        # DELLA's ranks are part of the method.
        stats = prepare(method, {path: base[path]}, {path: sources[path]})[path] \
            if method.stats_required else None
        merged[path] = _merge_leaf(method, is_stacked(path), base[path], sources[path], params, stats,
                                   leaf_key, options)
        bar.update(1)
    return merged


# Compiled once per method and tensor shape, whatever the parameter's name.
_merge_leaf = jax.jit(merge_leaf, static_argnums=(0, 1, 7))


def run_recipe(recipe: Recipe, out_dir, *, seed: int = 0, overwrite: bool = False,
               shard_size="5GB", progress: bool = True) -> Path:
    """Loads the recipe's models, merges, and saves an HF checkpoint plus the recipe."""
    for note in recipe.notes:
        print(f"note: {note}")
    names = [recipe.base_model] if recipe.base_model else []
    names += [s.model for sl in recipe.slices for s in sl.sources] + [sl.base_model for sl in recipe.slices]
    names = list(dict.fromkeys(n for n in names if n))
    load_dtype = str(recipe.dtype).removeprefix("torch.") if recipe.dtype else None
    check_output_dir(Path(out_dir), [Path(n) for n in names], overwrite)  # before any work
    loaded = {n: load(n, dtype=load_dtype) for n in names}
    for i, sl in enumerate(recipe.slices):
        for j, src in enumerate(sl.sources):
            available = loaded[src.model].config.num_layers
            if src.layer_range is not None and src.layer_range[1] > available:
                raise RecipeError(f"recipe.slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} "
                                  f"past the {available} layers of {src.model}")
    arch_names = {n: m.origin.architecture for n, m in loaded.items()}
    if len(set(arch_names.values())) > 1:
        raise RecipeError(f"models of different architectures: {arch_names}")
    arch = architecture_by_name(next(iter(arch_names.values())))
    models = {n: flat_params(m) for n, m in loaded.items()}
    tokenizer = None
    if recipe.tokenizer_source is not None:
        sizes = {n: int(flat["embed_tokens.weight"].shape[0]) for n, flat in models.items()}
        tokenizer = build_vocabulary(recipe.tokenizer_source, recipe.base_model or names[0], names, sizes)
        align_embeddings(models, permutations(tokenizer, names, sizes), recipe.base_model)

    key = jax.random.key(seed) if recipe.method.random else None
    first, last = recipe.slices[0], recipe.slices[-1]
    template_name = recipe.base_model or first.sources[0].model
    template = models[template_name]
    layer_paths = sorted(p for p in template if is_stacked(p))
    pre_paths = sorted(p for p in template if not is_stacked(p) and p.startswith("embed_tokens"))
    post_paths = sorted(p for p in template if not is_stacked(p) and p not in pre_paths)
    total = len(pre_paths) + len(post_paths) + len(layer_paths) * len(recipe.slices)
    merged: dict = {}
    with tqdm(total=total, desc="merging tensors", unit="tensor", disable=not progress) as bar:
        merged.update(_merge_group(recipe, first, models, arch, pre_paths, key, bar))
        pieces = [_merge_group(recipe, sl, models, arch, layer_paths,
                               None if key is None else jax.random.fold_in(key, 1000 + i), bar)
                  for i, sl in enumerate(recipe.slices)]
        merged.update({p: jnp.concatenate([piece[p] for piece in pieces]) for p in layer_paths})
        merged.update(_merge_group(recipe, last, models, arch, post_paths, key, bar))

    model = _assemble(loaded[template_name], merged)
    out_dtype = recipe.out_dtype or recipe.dtype
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        if tokenizer is not None:
            tokenizer.save_pretrained(tokenizer_dir)
        return save(model, out_dir, dtype=str(out_dtype).removeprefix("torch.") if out_dtype else None,
                    overwrite=overwrite, shard_size=shard_size,
                    tokenizer_dir=tokenizer_dir if tokenizer is not None else None,
                    inputs=names, extra_files={"mergekit_config.yml": recipe.text})


def _assemble(template: nnx.Module, flat: dict) -> nnx.Module:
    """A model shaped like `template` but with the merged parameters' layer count and vocabulary."""
    num_layers = next(v.shape[0] for p, v in flat.items() if is_stacked(p))
    embeddings = flat["embed_tokens.weight"]
    config = dataclasses.replace(template.config, num_layers=num_layers, vocab_size=embeddings.shape[0])
    arch = architecture_by_name(template.origin.architecture)
    abstract = nnx.eval_shape(lambda: arch.build(config, dtype=embeddings.dtype, rngs=nnx.Rngs(0)))
    model = with_params(abstract, flat)
    model.origin = template.origin
    return model


def merge_from_yaml(recipe_path, out_dir, **kwargs) -> Path:
    """`jaxmerge merge`: model paths in the recipe are relative to the working directory,
    as in mergekit."""
    recipe = parse_recipe(Path(recipe_path).read_text())
    return run_recipe(recipe, out_dir, **kwargs)
