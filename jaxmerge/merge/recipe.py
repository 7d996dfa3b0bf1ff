"""mergekit YAML recipes: parse, resolve parameters per tensor and layer, merge, save.

Semantics follow mergekit: a recipe lists `models` (all layers) or `slices` (layer ranges,
stacked one after another: a frankenmerge with `passthrough`). A parameter is a number, a
gradient (a list interpolated over the layers of a slice, t = i / (n - 1)) or a list of
{filter, value} entries (the first whose filter is a substring of the tensor name wins).
Precedence: the source's own parameters, then the slice's, then the top level.
Embeddings, the final norm and the output head take the value at t = 0.

Model paths are resolved (relative ones from the working directory, as in mergekit), so
`./m`, `m` and `/abs/m` name one model; a model listed twice in one slice is refused.

Dtypes: `dtype` is the one the models are merged in. Without it, as mergekit 0.1.5 does
(its merge methods promote each tensor's inputs with torch.promote_types), the models are
merged in the promotion of their dtypes: one dtype stays; float16 with bfloat16 gives
float32, so a bfloat16 weight beyond float16's range is kept. (mergekit's config.json then
names the base model's dtype; ours names the dtype written.) `out_dtype` (default: the
merge dtype) is the one written. A cast that turns a finite value into inf (a source into
`dtype`, a merged tensor, the output into `out_dtype`) is refused, naming the tensor.

`run_recipe` checks everything it can before loading any weights: the recipe (parameter
values, finite numbers, layer ranges), the output directory (never an input, or around
one: models, tokenizer_source, the recipe file), the shard size, every model's config.json
and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm.auto import tqdm

from jaxmerge.architectures import architecture_by_name, architecture_of
from jaxmerge.checkpoint import check_output_dir, dtype_name, load, parse_size, read_config, resolve_dtype, save
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
    source: str | None = None  # the file it was read from: an input, never replaced by the output


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


def _check_number(value: Any, where: str) -> bool | int | float:
    """A number (or a bool); a numeric string ("1e-3", which YAML 1.1 leaves a string) as
    mergekit's pydantic reads it. NaN and infinities are refused."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RecipeError(f"{where}: expected a number, got {value!r}") from None
    if not isinstance(value, (bool, int, float)):
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise RecipeError(f"{where}: {value} is not a finite number")
    return value


def _check_setting(value: Any, where: str) -> Any:
    """A parameter's value: a number, a gradient (a list of numbers), or {filter, value}
    entries (one mapping or a list of them), checked all the way down."""
    if isinstance(value, dict):
        return _check_entry(value, where)
    if not isinstance(value, list):
        return _check_number(value, where)
    if all(isinstance(v, dict) for v in value):
        return [_check_entry(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return [_check_number(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _check_entry(entry: dict, where: str) -> dict:
    if "value" not in entry or set(entry) - {"filter", "value"}:
        raise RecipeError(f"{where}: expected a {{filter, value}} entry, got {entry!r}")
    if entry.get("filter") is not None and not isinstance(entry["filter"], str):
        raise RecipeError(f"{where}.filter: expected a tensor name substring, got {entry['filter']!r}")
    return {**entry, "value": _check_setting(entry["value"], f"{where}.value")}


def _check_parameters(params: Any, method: MergeMethod, where: str) -> dict:
    if params is None:
        return {}
    allowed = {p.name for p in method.parameters} | OPTION_KEYS
    params = _check_keys(params, allowed, f"{where}.parameters")
    return {name: _check_setting(value, f"{where}.parameters.{name}") for name, value in params.items()}


def _check_layer_range(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in value)
            or not 0 <= value[0] < value[1]):
        raise RecipeError(f"{where}.layer_range: expected [start, end) with 0 <= start < end, got {value!r}")
    return value[0], value[1]


def _check_slice(method: MergeMethod, slice_: Slice, base: str | None, where: str) -> None:
    """What a slice needs whatever the models hold: the base where the method takes one, a
    model at most once, and the number of models the method merges."""
    seen: dict[str, int] = {}
    for j, source in enumerate(slice_.sources):
        if source.model in seen:
            raise RecipeError(f"{where}[{j}]: {source.model} is listed twice (also {where}[{seen[source.model]}])")
        seen[source.model] = j
    base_name = slice_.base_model or base
    if method.base == "required":
        if base_name is None:
            raise RecipeError(f"recipe: {method.name} needs a base_model")
        if base_name not in seen:
            raise RecipeError(f"{where}: base_model {base_name} is not among the slice's sources")
    inputs = [s for s in slice_.sources if not (method.base == "required" and s.model == base_name)]
    if not method.min_sources <= len(inputs) <= (method.max_sources or len(inputs)):
        lo, hi = method.min_sources, method.max_sources
        wanted = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi else f"at least {lo}")
        raise RecipeError(f"recipe: {method.name} takes {wanted} model(s) besides the base, got {len(inputs)}")


def parse_recipe(text: str, base_dir: Path | None = None, source: str | None = None) -> Recipe:
    """Parses mergekit YAML. Relative model paths are taken from `base_dir` (default: the
    working directory) and resolved. `source`: the file the text came from."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"recipe is not valid YAML ({at}{' '.join(str(reason).split())})") from None
    raw = _check_keys(raw, TOP_LEVEL_KEYS, "recipe")
    if "merge_method" not in raw:
        raise RecipeError("recipe: missing key 'merge_method'")
    try:
        method = get_method(raw["merge_method"])
    except KeyError as e:
        raise RecipeError(f"recipe.merge_method: {e.args[0]}") from None

    def path(p: str) -> str:
        return str(((base_dir or Path.cwd()) / p).resolve())

    base = path(_model_path(raw["base_model"], "recipe.base_model")) if raw.get("base_model") else None
    if ("models" in raw) == ("slices" in raw):
        raise RecipeError("recipe: give exactly one of 'models' or 'slices'")
    if "models" in raw:
        if not isinstance(raw["models"] or [], list):
            raise RecipeError("recipe.models: expected a list")
        sources = []
        for i, m in enumerate(raw["models"] or []):
            where = f"recipe.models[{i}]"
            m = _check_keys(m, {"model", "parameters"}, where)
            sources.append(Source(path(_model_path(m.get("model"), where)), None,
                                  _check_parameters(m.get("parameters"), method, where)))
        if not sources:
            raise RecipeError("recipe.models: empty")
        if base is not None and base not in [s.model for s in sources]:
            sources.append(Source(base, None, {}))  # mergekit adds the base as an input
        slices = [Slice(tuple(sources), None, {})]
        _check_slice(method, slices[0], base, "recipe.models")
    else:
        if not isinstance(raw["slices"] or [], list):
            raise RecipeError("recipe.slices: expected a list")
        slices = []
        for i, s in enumerate(raw["slices"] or []):
            where = f"recipe.slices[{i}]"
            s = _check_keys(s, {"sources", "base_model", "parameters"}, where)
            if not isinstance(s.get("sources") or [], list):
                raise RecipeError(f"{where}.sources: expected a list")
            sources = []
            for j, src in enumerate(s.get("sources") or []):
                w = f"{where}.sources[{j}]"
                src = _check_keys(src, {"model", "layer_range", "parameters"}, w)
                sources.append(Source(path(_model_path(src.get("model"), w)),
                                      _check_layer_range(src.get("layer_range"), w),
                                      _check_parameters(src.get("parameters"), method, w)))
            if not sources:
                raise RecipeError(f"{where}.sources: empty")
            lengths = {s_.layer_range[1] - s_.layer_range[0] for s_ in sources}
            if len(lengths) > 1:
                raise RecipeError(f"{where}: all sources of a slice must span the same number of layers")
            slice_base = path(_model_path(s["base_model"], f"{where}.base_model")) if s.get("base_model") else None
            slices.append(Slice(tuple(sources), slice_base, _check_parameters(s.get("parameters"), method, where)))
            _check_slice(method, slices[-1], base, f"{where}.sources")
        if not slices:
            raise RecipeError("recipe.slices: empty")

    notes = []
    top = _check_parameters(raw.get("parameters"), method, "recipe")
    if any("int8_mask" in d for d in [top] + [s.parameters for s in slices]):
        notes.append("int8_mask is accepted and ignored: masks here are never materialised per source")
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None and (not isinstance(tokenizer_source, str) or not tokenizer_source):
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
                  tokenizer_source, text, tuple(notes), source)


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
    """Merges the given parameter paths of one slice (checked by `_check_slice`)."""
    method = recipe.method
    base_name = slice_.base_model or recipe.base_model
    inputs = [s for s in slice_.sources if not (method.base == "required" and s.model == base_name)]
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


def _check_models(recipe: Recipe, names: list[str]) -> tuple[str, dict]:
    """Every model's config.json, read before any weights: the architecture they share and
    {name: config}; layer ranges within each model."""
    configs, arch_names = {}, {}
    for name in names:
        hf = read_config(Path(name))
        source = str(Path(name) / "config.json")
        arch = architecture_of(hf, source)
        arch_names[name], configs[name] = arch.name, arch.parse_config(hf, source)
    if len(set(arch_names.values())) > 1:
        raise RecipeError(f"models of different architectures: {arch_names}")
    for i, sl in enumerate(recipe.slices):
        for j, src in enumerate(sl.sources):
            available = configs[src.model].num_layers
            if src.layer_range is not None and src.layer_range[1] > available:
                raise RecipeError(f"recipe.slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} "
                                  f"past the {available} layers of {src.model}")
    return arch_names[names[0]], configs


def _cast_checked(flat: dict, dtype: np.dtype, arch, model: str) -> dict:
    """`flat` in `dtype`; raises, naming the tensor, where a finite value would become inf."""
    out = {}
    for path, value in flat.items():
        out[path] = value.astype(dtype)
        name = _first_non_finite(out[path], arch, path, before=value)
        if name is not None:
            raise RecipeError(f"tensor {name} of {model}: overflows {dtype_name(dtype)} (values beyond "
                              f"{float(jnp.finfo(dtype).max):g}); merge in a wider dtype (dtype: float32)")
    return out


def _first_non_finite(value: jax.Array, arch, path: str, before: jax.Array | None = None) -> str | None:
    """The checkpoint name of the first tensor (layer) of `value` with inf or NaN (only where
    `before`, if given, was finite), or None."""
    bad = ~jnp.isfinite(value) if before is None else jnp.isfinite(before) & ~jnp.isfinite(value)
    stacked = is_stacked(path)
    per_tensor = np.asarray(bad.reshape(bad.shape[0], -1).any(axis=1) if stacked else bad.any()[None])
    if not per_tensor.any():
        return None
    return _tensor_names(arch, path, value.shape[0] if stacked else 0)[int(np.argmax(per_tensor))]


def run_recipe(recipe: Recipe, out_dir, *, seed: int = 0, overwrite: bool = False,
               shard_size="5GB", progress: bool = True, allow_non_finite: bool = False) -> Path:
    """Loads the recipe's models, merges, and saves an HF checkpoint plus the recipe.
    Everything checkable without the weights is checked first (see the module docstring);
    a NaN or Inf in an input tensor is refused unless `allow_non_finite`."""
    names = [recipe.base_model] if recipe.base_model else []
    names += [s.model for sl in recipe.slices for s in sl.sources] + [sl.base_model for sl in recipe.slices]
    names = list(dict.fromkeys(n for n in names if n))
    tokenizer_path = recipe.tokenizer_source if recipe.tokenizer_source not in (None, "base", "union") else None
    inputs = names + [p for p in (tokenizer_path, recipe.source) if p]
    check_output_dir(Path(out_dir), [Path(p) for p in inputs], overwrite)
    parse_size(shard_size)
    arch_name, configs = _check_models(recipe, names)
    arch = architecture_by_name(arch_name)
    tokenizer = rows = None
    if recipe.tokenizer_source is not None:
        sizes = {n: getattr(c, "text", c).vocab_size for n, c in configs.items()}
        tokenizer = build_vocabulary(recipe.tokenizer_source, recipe.base_model or names[0], names, sizes)
        rows = permutations(tokenizer, names, sizes)
    for note in recipe.notes:
        print(f"note: {note}")

    # Each model is loaded in its own dtype (a cast to float16 is checked for overflow) and
    # only its parameters are kept.
    merge_dtype = resolve_dtype(str(recipe.dtype).removeprefix("torch.")) if recipe.dtype else None
    models, origins, dtypes = {}, {}, {}
    for n in names:
        model = load(n, dtype=None if merge_dtype in (None, np.float16) else merge_dtype,
                     allow_non_finite=allow_non_finite)
        models[n], origins[n], dtypes[n] = flat_params(model), model.origin, np.dtype(model.dtype)
        del model
    if merge_dtype is None:  # as mergekit: the promotion of the inputs' dtypes
        merge_dtype = np.dtype(jnp.result_type(*dtypes.values()))
    for n in names:
        if dtypes[n] != merge_dtype:
            models[n] = _cast_checked(models[n], merge_dtype, arch, n)
    if rows is not None:
        align_embeddings(models, rows, recipe.base_model)

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
    for path, value in merged.items():  # the merge computes in float32, then casts to the merge dtype
        name = None if allow_non_finite else _first_non_finite(value, arch, path)  # the inputs' NaN flow on
        if name is not None:
            hint = "check the recipe's parameters" if merge_dtype == np.float32 else "merge in float32 (dtype: float32)"
            raise RecipeError(f"tensor {name}: the merge in {dtype_name(merge_dtype)} gives inf or NaN; {hint}")

    model = _assemble(configs[template_name], origins[template_name], merged)
    out_dtype = recipe.out_dtype or recipe.dtype
    return save(model, out_dir, dtype=str(out_dtype).removeprefix("torch.") if out_dtype else None,
                overwrite=overwrite, shard_size=shard_size, tokenizer=tokenizer, inputs=inputs,
                extra_files={"mergekit_config.yml": recipe.text})


def _assemble(config, origin, flat: dict) -> nnx.Module:
    """A model of `config`'s architecture with the merged parameters' layer count and vocabulary."""
    num_layers = next(v.shape[0] for p, v in flat.items() if is_stacked(p))
    embeddings = flat["embed_tokens.weight"]
    config = dataclasses.replace(config, num_layers=num_layers, vocab_size=embeddings.shape[0])
    arch = architecture_by_name(origin.architecture)
    abstract = nnx.eval_shape(lambda: arch.build(config, dtype=embeddings.dtype, rngs=nnx.Rngs(0)))
    model = with_params(abstract, flat)
    model.origin = origin
    return model


def merge_from_yaml(recipe_path, out_dir, **kwargs) -> Path:
    """`jaxmerge merge`: model paths in the recipe are relative to the working directory,
    as in mergekit. Errors in the recipe name its file."""
    path = Path(recipe_path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RecipeError(f"{path}: cannot read the recipe ({reason})") from None
    try:
        recipe = parse_recipe(text, source=str(path))
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    return run_recipe(recipe, out_dir, **kwargs)
