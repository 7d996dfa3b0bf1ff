"""mergekit YAML recipes: parse, resolve parameters per tensor and layer, merge, save.

Semantics follow mergekit: a recipe lists `models` (all layers) or `slices` (layer ranges,
stacked one after another: a frankenmerge with `passthrough`). A parameter is a number, a
gradient (a list interpolated over the layers of a slice, t = i / (n - 1)) or a list of
{filter, value} entries (the first whose filter is a substring of the tensor name wins).
Precedence: the source's own parameters, then the slice's, then the top level.
Embeddings, the final norm and the output head take the value at t = 0.

Model paths are resolved (relative ones from the working directory, as in mergekit), so
`./m`, `m` and `/abs/m` name one model; a model listed twice in one slice is refused. A
Hub reference (`org/name[@revision]`) resolves to its snapshot in the Hugging Face cache,
and the recipe written beside the merge names it pinned to that commit (`org/name@<commit>`).

Keys as mergekit 0.1.5 treats them: a key its schema does not read (a top-level one, a
model's or a slice's, `residual_weight`, a parameter the method does not take such as
slerp's `weight`, a merge-wide parameter among a model's own, the base model's own
parameters) is ignored, with one warning per key naming where; a key that changes
mergekit's merge and that jaxmerge lacks (`modules`, `tokenizer`, `chat_template`, a
parameter of the method it does not implement) is refused; della's epsilon is refused where
mergekit refuses it (density +/- epsilon outside (0, 1), per tensor); `int8_mask` changes
nothing in mergekit's results and is accepted as a no-op (see OPTION_KEYS).

Random methods (DARE, DELLA): the top-level key `jaxmerge_seed` (mergekit ignores it) seeds
the masks, overridden by run_recipe's `seed` (default 0); each tensor's key is derived as
the in-memory merge derives it (`_jobs`), so a recipe exported with its seed (`evolve`,
`search.export`) rebuilds that merge.

Dtypes: `dtype` is the one the models are merged in, computing as mergekit 0.1.5 computes
in it (each step rounded to it: `merge.methods.rounding`), or, with run_recipe's
compute_dtype="float32", in float32 rounded once at the end. Without it, as mergekit 0.1.5 does
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

(Over 500 lines: parsing, checking and the run of a recipe follow mergekit's schema
key by key; the per-tensor plan is in `plan.py`, the streamed executor in `stream.py`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm.auto import tqdm

from jaxmerge import yaml_input
from jaxmerge.architectures import architecture_by_name, architecture_of
from jaxmerge.checkpoint import (
    Origin,
    ParamPlan,
    check_claimed_sizes,
    check_tensors,
    companion_files,
    open_tensors,
    parameter_plan,
    read_config,
    resolve_dtype,
    weight_files,
)
from jaxmerge.hub import hub_models, parse_reference, resolve_model
from jaxmerge.merge.methods import COMPUTE_DTYPES, TIE_RULES, MergeMethod, get_method
from jaxmerge.merge.plan import MergePlan, RecipeError, plan_options, resolve_setting, tensor_params
from jaxmerge.merge.stream import Models, ShardWriter, TensorErrors, TensorJob, run_jobs
from jaxmerge.merge.tree import VOCAB_AXES
from jaxmerge.merge.vocab import build_vocabulary, permutations
from jaxmerge.models.config import TransformerConfig
from jaxmerge.outputs import check_output_dir, staged_output
from jaxmerge.saving import output_config, parse_size, write_companion_files

log = logging.getLogger(__name__)

SEED_KEY = "jaxmerge_seed"  # the seed of a random method's masks (DARE, DELLA); mergekit ignores the key
TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source", "name", SEED_KEY}
# mergekit 0.1.5's top-level keys that change its merge and that jaxmerge does not support (refused);
# a key mergekit does not know is ignored by it (pydantic's default), and here with a warning.
MERGEKIT_UNSUPPORTED_KEYS = {"modules", "tokenizer", "chat_template"}
# int8_mask: mergekit 0.1.5 builds its sign masks in int8 instead of the merge dtype; their
# values (-1, 0, 1) are exact in both and the mask it uses is the bool `sign == majority` either
# way (sce's 0/1 selection mask multiplies exactly in both), so the flag cannot change a result:
# it is accepted as a no-op (tests/test_merge_recipe_keys.py checks mergekit's bits both ways).
OPTION_KEYS = {"normalize", "rescale", "int8_mask"}
MODEL_KEYS = ("model", "base_model", "tokenizer_source")  # the keys whose values name a model

_GTA = (("weight", "density"), ("int8_mask", "normalize", "rescale", "lambda"))
# Each mergekit 0.1.5 method's parameters: (read per model, read for the merge). mergekit reads a
# per-model one from a model's own parameters, its slice's or the recipe's; a merge-wide one from
# the slice's or the recipe's only; any other name it ignores.
MERGEKIT_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("weight",), ("normalize",)),
    **dict.fromkeys(("task_arithmetic", "ties", "dare_ties", "dare_linear"), _GTA),
    **dict.fromkeys(("breadcrumbs", "breadcrumbs_ties"), (_GTA[0] + ("gamma",), _GTA[1])),
    **dict.fromkeys(("della", "della_linear"), (_GTA[0] + ("epsilon",), _GTA[1])),
    "slerp": ((), ("t",)),
    "nearswap": ((), ("t",)),
    "model_stock": ((), ("filter_wise",)),
    "passthrough": (("scale",), ()),
    "karcher": ((), ("max_iter", "tol")),
    "multislerp": (("weight",), ("normalize_weights", "eps")),
    "nuslerp": (("weight",), ("nuslerp_row_wise", "nuslerp_flatten")),
    "ram": ((), ("epsilon",)),
    "ramplus_tl": ((), ("r", "alpha", "epsilon")),
    "sce": ((), ("int8_mask", "select_topk")),
    "arcee_fusion": ((), ()),
}
DELLA_METHODS = ("della", "della_linear")  # mergekit refuses epsilon where density +/- epsilon leaves (0, 1)


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
    references: tuple[tuple[str, str], ...] = ()  # (snapshot directory, Hub reference as written) per Hub model
    seed: int | None = None  # jaxmerge_seed: the masks' seed of a random method (`run_recipe`'s default)


# ----------------------------------------------------------------------------- parsing


class _Ignored:
    """The keys of a recipe that mergekit ignores, collected while parsing and logged as one
    warning per key and reason, naming the first place and how many more."""

    def __init__(self):
        self.places: dict[tuple[str, str], list[str]] = {}

    def add(self, where: str, key: str, why: str) -> None:
        self.places.setdefault((key, why), []).append(where)

    def log(self) -> None:
        for (key, why), places in self.places.items():
            more = f" (and {len(places) - 1} more)" if len(places) > 1 else ""
            log.warning("%s: ignoring %r as mergekit does (%s)%s", places[0], key, why, more)


def _mergekit_keys(mapping: Any, supported: set[str], where: str, ignored: _Ignored,
                   refused: set[str] = frozenset()) -> dict:
    """The mapping's supported keys; a key mergekit uses and jaxmerge does not (`refused`) is
    refused, any other key mergekit does not know is ignored (as mergekit ignores it)."""
    if not isinstance(mapping, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unsupported = sorted(set(mapping) & set(refused))
    if unsupported:
        raise RecipeError(f"{where}: unsupported key(s) {', '.join(map(repr, unsupported))} (mergekit's, not "
                          f"jaxmerge's; supported: {', '.join(sorted(supported))})")
    for key in mapping:
        if key not in supported:
            ignored.add(where, key, "not a key mergekit reads here")
    return {k: v for k, v in mapping.items() if k in supported}


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


def _check_parameters(params: Any, method: MergeMethod, where: str, ignored: _Ignored, *, own: bool = False) -> dict:
    """A `parameters` mapping, checked; `own`: a model's own. As mergekit 0.1.5 reads it
    (`MERGEKIT_PARAMETERS`): a parameter it reads and jaxmerge's method lacks is refused, one it
    does not read (another method's, or a merge-wide one among a model's own) ignored with a
    warning. A method mergekit lacks takes its parameters and OPTION_KEYS, nothing else."""
    if params is None:
        return {}
    ours_per_source = {p.name for p in method.parameters if p.per_source}
    ours = {p.name for p in method.parameters}
    if method.name not in MERGEKIT_PARAMETERS:
        params = _check_keys(params, ours | OPTION_KEYS, f"{where}.parameters")
        return {name: _check_setting(value, f"{where}.parameters.{name}") for name, value in params.items()}
    if not isinstance(params, dict):
        raise RecipeError(f"{where}.parameters: expected a mapping, got {type(params).__name__}")
    per_model, merge_wide = MERGEKIT_PARAMETERS[method.name]
    read = set(per_model) if own else set(per_model) | set(merge_wide)
    supported = (ours_per_source if own else ours) | (OPTION_KEYS & set(merge_wide))
    checked = {}
    for name, value in params.items():
        if name not in read:
            why = (f"{method.name} reads {name} from a slice's or the recipe's parameters, not a model's"
                   if name in merge_wide else f"{method.name} has no parameter {name}")
            ignored.add(f"{where}.parameters", name, why)
        elif name not in supported:
            raise RecipeError(f"{where}.parameters: unsupported key {name!r} (mergekit's {method.name} reads it, "
                              f"jaxmerge's does not; supported: {', '.join(sorted(supported))})")
        else:
            checked[name] = _check_setting(value, f"{where}.parameters.{name}")
    return checked


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
    takes_base = method.base == "required" or (method.base == "optional" and base_name is not None)
    if takes_base:
        if base_name is None:
            raise RecipeError(f"recipe: {method.name} needs a base_model")
        if base_name not in seen:
            raise RecipeError(f"{where}: base_model {base_name} is not among the slice's sources")
    inputs = [s for s in slice_.sources if not (takes_base and s.model == base_name)]
    if not method.min_sources <= len(inputs) <= (method.max_sources or len(inputs)):
        lo, hi = method.min_sources, method.max_sources
        wanted = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi else f"at least {lo}")
        raise RecipeError(f"recipe: {method.name} takes {wanted} model(s) besides the base, got {len(inputs)}")


def _base_parameters(method: MergeMethod, sources: list[Source], base: str | None, where: str,
                     ignored: _Ignored) -> None:
    """A base model's own parameters, which a method taking a base never reads (nor mergekit)."""
    for j, source in enumerate(sources):
        if method.base in ("required", "optional") and source.model == base:
            for name in source.parameters:
                ignored.add(f"{where}[{j}].parameters", name, f"{method.name} reads no parameter of its base model")


def _parse_slices(raw_slices: Any, method: MergeMethod, base: str | None, path, ignored: _Ignored) -> list[Slice]:
    """A recipe's `slices`; `path` resolves a model path."""
    if not isinstance(raw_slices or [], list):
        raise RecipeError("recipe.slices: expected a list")
    slices = []
    for i, s in enumerate(raw_slices or []):
        where = f"recipe.slices[{i}]"
        s = _mergekit_keys(s, {"sources", "base_model", "parameters"}, where, ignored)
        if not isinstance(s.get("sources") or [], list):
            raise RecipeError(f"{where}.sources: expected a list")
        sources = []
        for j, src in enumerate(s.get("sources") or []):
            w = f"{where}.sources[{j}]"
            src = _mergekit_keys(src, {"model", "layer_range", "parameters"}, w, ignored)
            sources.append(Source(path(_model_path(src.get("model"), w)),
                                  _check_layer_range(src.get("layer_range"), w),
                                  _check_parameters(src.get("parameters"), method, w, ignored, own=True)))
        if not sources:
            raise RecipeError(f"{where}.sources: empty")
        lengths = {s_.layer_range[1] - s_.layer_range[0] for s_ in sources}
        if len(lengths) > 1:
            raise RecipeError(f"{where}: all sources of a slice must span the same number of layers")
        slice_base = path(_model_path(s["base_model"], f"{where}.base_model")) if s.get("base_model") else None
        slices.append(Slice(tuple(sources), slice_base, _check_parameters(s.get("parameters"), method, where,
                                                                          ignored)))
        _check_slice(method, slices[-1], base, f"{where}.sources")
        _base_parameters(method, sources, slice_base or base, f"{where}.sources", ignored)
    if not slices:
        raise RecipeError("recipe.slices: empty")
    return slices


def _parse_models(raw_models: Any, method: MergeMethod, base: str | None, path, ignored: _Ignored) -> list[Slice]:
    """A recipe's `models`, as one slice of every layer; `path` resolves a model path."""
    if not isinstance(raw_models or [], list):
        raise RecipeError("recipe.models: expected a list")
    sources = []
    for i, m in enumerate(raw_models or []):
        where = f"recipe.models[{i}]"
        m = _mergekit_keys(m, {"model", "parameters"}, where, ignored)
        sources.append(Source(path(_model_path(m.get("model"), where)), None,
                              _check_parameters(m.get("parameters"), method, where, ignored, own=True)))
    if not sources:
        raise RecipeError("recipe.models: empty")
    _base_parameters(method, sources, base, "recipe.models", ignored)
    if base is not None and base not in [s.model for s in sources]:
        sources.append(Source(base, None, {}))  # mergekit adds the base as an input
    slices = [Slice(tuple(sources), None, {})]
    _check_slice(method, slices[0], base, "recipe.models")
    return slices


def _parse_method(raw: dict) -> MergeMethod:
    if "merge_method" not in raw:
        raise RecipeError("recipe: missing key 'merge_method'")
    try:
        return get_method(raw["merge_method"])
    except KeyError as e:
        raise RecipeError(f"recipe.merge_method: {e.args[0]}") from None


def _parse_tokenizer_source(value: Any, path) -> str | None:
    """None, 'base', 'union', or a model path (resolved by `path`)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise RecipeError("recipe.tokenizer_source: expected 'base', 'union' or a model path")
    return path(value) if value not in (None, "base", "union") else value


def _check_seed(value: Any, where: str) -> int:
    """A seed of jax.random.key: an integer from 0 to 2^32 - 1 (as search.seed)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise RecipeError(f"{where}: expected an integer from 0 to {2**32 - 1}, got {value!r}")
    return value


def _check_dtypes(raw: dict) -> None:
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None:
            try:
                resolve_dtype(str(raw[key]).removeprefix("torch."))
            except ValueError as e:
                raise RecipeError(f"recipe.{key}: {e}") from None


def parse_recipe(text: str, base_dir: Path | None = None, source: str | None = None) -> Recipe:
    """Parses mergekit YAML. Relative model paths are taken from `base_dir` (default: the
    working directory) and resolved. `source`: the file the text came from."""
    try:
        raw = yaml_input.safe_load(text, source or "recipe")
    except yaml_input.YamlInputError as e:
        raise RecipeError(str(e)) from None
    ignored = _Ignored()
    raw = _mergekit_keys(raw, TOP_LEVEL_KEYS, "recipe", ignored, MERGEKIT_UNSUPPORTED_KEYS)
    method = _parse_method(raw)

    references: dict[str, str] = {}

    def path(p: str) -> str:
        """A model's directory: the path (relative ones from base_dir, else the working
        directory), or, where none exists, the snapshot of the Hub reference it spells."""
        local = (base_dir or Path.cwd()) / p
        if not local.exists() and parse_reference(p) is not None:
            snapshot = str(resolve_model(p))
            references[snapshot] = p
            return snapshot
        return str(local.resolve())

    base = path(_model_path(raw["base_model"], "recipe.base_model")) if raw.get("base_model") else None
    if ("models" in raw) == ("slices" in raw):
        raise RecipeError("recipe: give exactly one of 'models' or 'slices'")
    if "models" in raw:
        slices = _parse_models(raw["models"], method, base, path, ignored)
    else:
        slices = _parse_slices(raw["slices"], method, base, path, ignored)

    top = _check_parameters(raw.get("parameters"), method, "recipe", ignored)
    tokenizer_source = _parse_tokenizer_source(raw.get("tokenizer_source"), path)
    _check_dtypes(raw)
    seed = _check_seed(raw.get(SEED_KEY), f"recipe.{SEED_KEY}") if raw.get(SEED_KEY) is not None else None
    ignored.log()
    return Recipe(method, base, tuple(slices), top, raw.get("dtype"), raw.get("out_dtype"),
                  tokenizer_source, text, (), source, tuple(references.items()), seed)


def pinned_text(recipe: Recipe) -> str:
    """The recipe's text as given, each Hub reference in it pinned to the commit it resolved
    to (`org/name@<commit>`), under a comment naming what each was written as: written beside
    the merge, it reruns on exactly the weights merged. The text as given where none moves."""
    models = hub_models(recipe.references)
    pins = {written: entry["pinned"] for written, entry in models.items() if entry["pinned"] != written}
    if not pins:
        return recipe.text
    spans: dict[int, tuple[int, str]] = {}  # start -> (end, the pinned scalar); an alias's node counted once

    def visit(node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value in MODEL_KEYS and isinstance(value, yaml.ScalarNode) \
                        and value.value in pins:
                    quote = value.style if value.style in ("'", '"') else ""
                    scalar, end = f"{quote}{value.value}{quote}", value.end_mark.index  # (its start: at an anchor)
                    if recipe.text[end - len(scalar):end] == scalar:  # the scalar as written, left as it is if not
                        spans[end - len(scalar)] = (end, f"{quote}{pins[value.value]}{quote}")
                visit(value)
        elif isinstance(node, yaml.SequenceNode):
            for value in node.value:
                visit(value)

    visit(yaml_input.compose(recipe.text, recipe.source or "recipe"))
    text = recipe.text
    for start in sorted(spans, reverse=True):
        end, pinned = spans[start]
        text = text[:start] + pinned + text[end:]
    header = "".join(f"# {written} was merged at commit {models[written]['commit']} (pinned below)\n"
                     for written in sorted(pins))
    return header + text


def seeded_text(text: str, seed: int, source: str) -> str:
    """The recipe's text with `jaxmerge_seed: seed` (its value replaced, or the key added at
    the end of the top-level mapping), everything else as it was."""
    node = yaml_input.compose(text, source)
    for key, value in node.value:
        if key.value == SEED_KEY:
            return text[:value.start_mark.index] + str(seed) + text[value.end_mark.index:]
    at = node.end_mark.index
    if node.flow_style:  # {merge_method: ..., ...}: before its closing brace
        at = text.rindex("}", 0, at)
        return f"{text[:at]}, {SEED_KEY}: {seed}{text[at:]}"
    line = " " * node.start_mark.column + f"{SEED_KEY}: {seed}\n"
    return text[:at] + ("" if at == 0 or text[at - 1] == "\n" else "\n") + line + text[at:]


# ----------------------------------------------------------------------------- running


def _check_models(recipe: Recipe, names: list[str]) -> tuple[str, dict]:
    """Every model's config.json, read before any weights: the architecture they share and
    {name: config}; layer ranges within each model."""
    configs, arch_names = {}, {}
    for name in names:
        hf = read_config(Path(name))
        source = str(Path(name) / "config.json")
        arch = architecture_of(hf, source)
        check_claimed_sizes(arch, hf, Path(name))  # before planning anything from its numbers
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


@functools.cache
def _plan_of(arch_name: str, config) -> tuple[ParamPlan, ...]:
    """The model's parameters (paths, shapes, checkpoint keys) from its config alone."""
    arch = architecture_by_name(arch_name)
    abstract = nnx.eval_shape(lambda: arch.build(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    _, state, _ = nnx.split(abstract, nnx.Param, ...)
    return tuple(parameter_plan(arch, config, state))


def _layer_key(plan: ParamPlan, arch, index: int) -> str:
    """The checkpoint key of layer `index` of a stacked parameter."""
    return arch.checkpoint_keys(plan.path, index + 1)[index]


def _scopes(recipe: Recipe, slice_: Slice) -> list[tuple[str, dict]]:
    """Where a merge-wide parameter is looked up, nearest first (a source's own come before)."""
    return [("slice", slice_.parameters), ("recipe", recipe.parameters)]


def _check_della(recipe: Recipe, sources: list[tuple[str, list]], name: str, t: float) -> None:
    """mergekit's check of DELLA's epsilon (mergekit.sparsify.della_magprune), on the values it
    resolves for each source and tensor, in its float64 arithmetic: where 0 < density < 1,
    density + epsilon must stay below 1 and density - epsilon above 0."""
    defaults = {p.name: p.default for p in recipe.method.parameters}
    for model, scopes in sources:
        density = resolve_setting("density", scopes, name, t, defaults["density"], model)
        epsilon = resolve_setting("epsilon", scopes, name, t, defaults["epsilon"], model)
        if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            raise RecipeError(f"recipe: {recipe.method.name} with density {density:g} and epsilon {epsilon:g} for "
                              f"{model} (tensor {name}): density +/- epsilon must lie in (0, 1), as mergekit requires")


def _tensor_params(recipe: Recipe, slice_: Slice, inputs: list[Source], name: str, t: float) -> dict:
    scopes = _scopes(recipe, slice_)
    sources = [(s.model, [("source", s.parameters)] + scopes) for s in inputs]
    if recipe.method.name in DELLA_METHODS:
        _check_della(recipe, sources, name, t)
    return tensor_params(recipe.method, sources, scopes, name, t)


class _Jobs:
    """Builds every output tensor's job (its inputs, in mergekit's semantics: see the module
    docstring) and the plans of their parameters, one per group of tensors sharing a slice."""

    def __init__(self, recipe: Recipe, arch, configs: dict, vocab_rows: int | None):
        self.recipe, self.arch, self.vocab_rows = recipe, arch, vocab_rows
        self.layouts = {n: {p.path: p for p in _plan_of(arch.name, c)} for n, c in configs.items()}
        self.jobs: list[TensorJob] = []
        self.plans: list[MergePlan] = []
        self.out_layers: dict[tuple, int] = {}  # stacked parameter -> output layers so far
        self.layer_sources: dict[str, list] = {}  # stacked path -> (model, layer) per output layer (layer types)
        self.path_index: dict[str, int] = {}  # parameter path -> its place among the template's, sorted

    def shape_of(self, layout: ParamPlan) -> tuple[int, ...]:
        shape = layout.checkpoint_shape
        vocab = self.vocab_rows is not None and ".".join(layout.path) in VOCAB_PATHS
        return (self.vocab_rows,) + shape[1:] if vocab else shape

    def group(self, slice_index: int, layouts: list[ParamPlan]) -> None:
        """The tensors `layouts` from slice `slice_index`, with their plan."""
        recipe, method = self.recipe, self.recipe.method
        slice_ = recipe.slices[slice_index]
        base_name = slice_.base_model or recipe.base_model
        has_base = method.base == "required" or (method.base == "optional" and base_name is not None)
        inputs = [s for s in slice_.sources if not (has_base and s.model == base_name)]
        base_source = next((s for s in slice_.sources if s.model == base_name), None)
        params: dict[str, dict] = {}
        for layout in layouts:
            dotted = ".".join(layout.path)
            if not layout.stacked:
                key = layout.keys[0]
                self.jobs.append(TensorJob(
                    key=key, path=dotted, base=(base_source.model, key) if has_base else None,
                    sources=tuple((s.model, key) for s in inputs), key_data=(self.path_index[dotted],),
                    shape=self.shape_of(layout)))
                params[key] = _tensor_params(recipe, slice_, inputs, key, 0.0)
            else:
                self.layers(slice_index, layout, inputs, base_source if has_base else None, params)
        self.plans.append(MergePlan(method.name, plan_options(method, _scopes(recipe, slice_)), params))

    def layer_range(self, source: Source, layout: ParamPlan) -> range:
        count = self.layouts[source.model][layout.path].shape[0]
        return range(count)[slice(*source.layer_range) if source.layer_range else slice(None)]

    def layers(self, slice_index: int, layout: ParamPlan, inputs: list[Source], base_source: Source | None,
               params: dict) -> None:
        """A stacked parameter's layers from one slice, appended to the output's."""
        shape_source = base_source or inputs[0]
        dotted = ".".join(layout.path)
        count = len(self.layer_range(shape_source, layout))
        out_start = self.out_layers.get(layout.path, 0)

        def member(source: Source, i: int) -> tuple[str, str]:
            available = self.layer_range(source, layout)
            if i >= len(available):
                raise RecipeError(f"recipe.slices[{slice_index}]: {source.model} has {len(available)} "
                                  f"layers in its range, {shape_source.model} {count}")
            return source.model, _layer_key(self.layouts[source.model][layout.path], self.arch, available[i])

        for i in range(count):
            key = _layer_key(layout, self.arch, out_start + i)
            self.jobs.append(TensorJob(
                key=key, path=dotted, base=member(base_source, i) if base_source else None,
                sources=tuple(member(s, i) for s in inputs),
                key_data=(self.path_index[dotted], out_start + i), shape=self.shape_of(layout)))
            # parameters see the slice's own layer numbering
            t = i / (count - 1) if count > 1 else 1.0
            params[key] = _tensor_params(self.recipe, self.recipe.slices[slice_index], inputs,
                                         _layer_key(layout, self.arch, i), t)
            self.layer_sources.setdefault(dotted, []).append(
                (shape_source.model, self.layer_range(shape_source, layout)[i]))
        self.out_layers[layout.path] = out_start + count


def _jobs(recipe: Recipe, arch, configs: dict, template_name: str, vocab_rows: int | None
          ) -> tuple[list[TensorJob], list[MergePlan], dict[tuple, int], dict[str, list]]:
    """Every output tensor as a job (its inputs and PRNG fold-ins) and the plans of their
    parameters, in mergekit's semantics (see the module docstring). Also returns each stacked
    parameter's output layer count, and the output's layer types per stacked path.

    A tensor's PRNG key (random methods) is the seed's key folded with the parameter's place
    among the model's sorted parameter paths, then (stacked) with its output layer: the keys
    the in-memory merge (`merge.tree.merge_plan`) gives the same tensors (its split(key, n)[i]
    is fold_in(key, i) under JAX's default jax_threefry_partitionable), so an evolved recipe
    with its seed redraws the evolved merge's masks."""
    built = _Jobs(recipe, arch, configs, vocab_rows)
    template = built.layouts[template_name]
    built.path_index = {dotted: i for i, dotted in enumerate(sorted(".".join(p) for p in template))}
    stacked = [p for p in template.values() if p.stacked]
    built.out_layers = {p.path: 0 for p in stacked}
    built.group(0, [p for p in template.values() if not p.stacked and p.path[0] == "embed_tokens"])
    for i in range(len(recipe.slices)):
        built.group(i, stacked)
    built.group(len(recipe.slices) - 1, [p for p in template.values() if not p.stacked and p.path[0] != "embed_tokens"])
    return built.jobs, built.plans, built.out_layers, built.layer_sources


VOCAB_PATHS = set(VOCAB_AXES)  # token-indexed parameters: rows re-ordered with the vocabulary


def _output_config(config, jobs: list[TensorJob], out_layers: dict, layer_sources: dict, configs: dict):
    """The template's config with the output's layer count, vocabulary and layer types."""
    if not isinstance(config, TransformerConfig):  # a VLM or layer path: its structure cannot change here
        changed = {n for n in out_layers.values()} - {config.num_layers} if hasattr(config, "num_layers") else set()
        if changed and not isinstance(getattr(config, "text", None), TransformerConfig):
            raise RecipeError("slices that change the layer count are supported for language models only")
        return config
    num_layers = next(iter(out_layers.values())) if out_layers else config.num_layers
    embeddings = next(j for j in jobs if j.path == "embed_tokens.weight")
    fields = dict(num_layers=num_layers, vocab_size=embeddings.shape[0])
    if config.layer_types is not None:  # each output layer keeps its source layer's type
        first = sorted(layer_sources)[0]
        fields["layer_types"] = tuple(configs[m].layer_types[i] for m, i in layer_sources[first])
    return dataclasses.replace(config, **fields)


def run_recipe(recipe: Recipe, out_dir, *, seed: int | None = None, overwrite: bool = False,
               shard_size="5GB", progress: bool = True, allow_non_finite: bool = False,
               copy_tokenizer: bool = True, write_recipe: bool = True, compute_dtype: str | None = None,
               ties: str = "index") -> Path:
    """Merges the recipe's models tensor by tensor from disk to disk (`merge.stream`) and
    writes an HF checkpoint plus the recipe. Everything checkable without the weights is
    checked first (see the module docstring); a NaN or Inf in an input tensor is refused
    unless `allow_non_finite`.

    seed: a random method's (DARE, DELLA), overriding the recipe's `jaxmerge_seed` (default
    0); the recipe written beside the merge names the seed used. As mergekit-yaml's options:
    copy_tokenizer=False writes no tokenizer or generation files (unless `tokenizer_source`
    builds a tokenizer), write_recipe=False no mergekit_config.yml. compute_dtype: None computes
    as mergekit does in the merge dtype (its bits); "float32" in float32, rounded once at the end
    (the more accurate result where the merge dtype is bfloat16 or float16). ties: which of the
    entries tied at TIES' or breadcrumbs' cut are kept (exactly as many as mergekit keeps either
    way): "index" the first in flat order (as the in-memory merge, so that an exported recipe
    rebuilds its checkpoint), "torch" those mergekit keeps on a CPU (torch's sort replayed on the
    host: mergekit's bits, slower where runs of ties are cut, as in half precision)."""
    if ties not in TIE_RULES:
        raise RecipeError(f"ties: expected one of {', '.join(TIE_RULES)}, got {ties!r}")
    if compute_dtype not in (None, "float32"):
        raise RecipeError(f"compute_dtype: expected float32 (or None: the merge dtype, as mergekit), "
                          f"got {compute_dtype!r}")
    names = [recipe.base_model] if recipe.base_model else []
    names += [s.model for sl in recipe.slices for s in sl.sources] + [sl.base_model for sl in recipe.slices]
    names = list(dict.fromkeys(n for n in names if n))
    tokenizer_path = recipe.tokenizer_source if recipe.tokenizer_source not in (None, "base", "union") else None
    inputs = names + [p for p in (tokenizer_path, recipe.source) if p]
    out = Path(out_dir)
    protected = [Path(p) for p in inputs]
    check_output_dir(out, protected, overwrite)
    size = parse_size(shard_size)
    seed = _check_seed(seed, "seed") if seed is not None else recipe.seed if recipe.seed is not None else 0
    arch_name, configs = _check_models(recipe, names)
    arch = architecture_by_name(arch_name)
    tokenizer = rows = None
    if recipe.tokenizer_source is not None:
        sizes = {n: getattr(c, "text", c).vocab_size for n, c in configs.items()}
        tokenizer = build_vocabulary(recipe.tokenizer_source, recipe.base_model or names[0], names, sizes)
        rows = permutations(tokenizer, names, sizes)
    for note in recipe.notes:
        log.info("note: %s", note)

    template_name = recipe.base_model or recipe.slices[0].sources[0].model
    if tokenizer is None and copy_tokenizer:
        companion_files(Path(template_name))  # what will be copied, checked before the merge runs
    vocab_rows = len(next(iter(rows.values()))) if rows is not None else None
    jobs, plans, out_layers, layer_sources = _jobs(recipe, arch, configs, template_name, vocab_rows)
    with contextlib.ExitStack() as stack:
        tensors, checkpoint_dtypes = {}, {}
        for n in names:  # headers only: every tensor present, of its shape, nothing unexpected
            directory = Path(n)
            tensors[n] = open_tensors(weight_files(directory), stack, arch.canonical_key)
            checkpoint_dtypes[n] = check_tensors(list(_plan_of(arch.name, configs[n])), tensors[n], arch,
                                                 configs[n], directory)
        # Each model is read in its own dtype, or the recipe's (float16: read in its own, then cast
        # with an overflow check); merged in the recipe's dtype, else the promotion of the models'.
        merge_dtype = resolve_dtype(str(recipe.dtype).removeprefix("torch.")) if recipe.dtype else None
        read_dtypes = {n: d if merge_dtype in (None, np.float16) else merge_dtype for n, d in checkpoint_dtypes.items()}
        if merge_dtype is None:  # as mergekit: the promotion of the inputs' dtypes
            merge_dtype = np.dtype(jnp.result_type(*read_dtypes.values()))
        out_dtype = recipe.out_dtype or recipe.dtype
        out_dtype = resolve_dtype(str(out_dtype).removeprefix("torch.")) if out_dtype else merge_dtype
        models = Models(tensors, read_dtypes, rows, {}, recipe.base_model)
        stack.callback(models.reader.close)
        config = _output_config(configs[template_name], jobs, out_layers, layer_sources, configs)
        origin = Origin(arch.name, json.dumps(read_config(Path(template_name))), str(Path(template_name).resolve()))
        key = None
        if recipe.method.random:  # the masks jaxmerge_seed names (see _jobs), as the in-memory merge draws them
            key = jax.random.key(seed)
            log.info("%s masks drawn from seed %d", recipe.method.name, seed)
        vocab_paths = VOCAB_PATHS if isinstance(configs[template_name], TransformerConfig) else set()
        with staged_output(out, overwrite) as tmp, tqdm(total=len(jobs), desc="merging tensors", unit="tensor",
                                                        disable=not progress) as bar:
            writer = ShardWriter(tmp, [(j.key, out_dtype, j.shape) for j in jobs], size)
            try:
                run_jobs(jobs, plans, models, writer, merge_dtype=merge_dtype,
                         out_dtype=out_dtype, seed_key=key, vocab_paths=vocab_paths,
                         allow_non_finite=allow_non_finite, errors=TensorErrors(merge_dtype, out_dtype, read_dtypes),
                         progress=bar.update, compute_dtype=_compute_dtype(merge_dtype, compute_dtype), ties=ties)
            finally:
                writer.close()
            hf = output_config(arch, config, origin, out_dtype)
            text = pinned_text(recipe)
            if recipe.method.random and seed != recipe.seed:
                text = seeded_text(text, seed, recipe.source or "recipe")
            copied_from = origin if copy_tokenizer else dataclasses.replace(origin, directory=None)
            write_companion_files(tmp, arch, hf, copied_from, tokenizer=tokenizer,
                                  extra_files={"mergekit_config.yml": text} if write_recipe else {})
            check_output_dir(out, protected, overwrite)  # again: a long merge gives others time to write there
    return out


def _compute_dtype(merge_dtype: np.dtype, requested: str | None) -> str | None:
    """The methods' compute dtype (`Options.compute_dtype`): mergekit's, the merge dtype (a
    dtype JAX computes in: float64 falls back to float32 math), unless float32 is requested."""
    name = np.dtype(merge_dtype).name
    return None if requested == "float32" or name not in COMPUTE_DTYPES else name


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
