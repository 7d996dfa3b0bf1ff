"""A merge plan: which parameters each tensor of a merge gets.

A recipe (`merge.recipe`) and a genome (`search.genome`) both become a `MergePlan`; the
in-memory executor (`merge.tree.merge_plan`, jitted) and the disk-to-disk one
(`merge.stream.run_jobs`) run it, and `search.export.recipe_yaml` writes it as mergekit YAML.

    plan = MergePlan("ties", Options(normalize=True), {
        "layers.mlp.up_proj.kernel": {"weight": [K, L], "density": [K, L]},  # stacked: a layer axis
        "embed_tokens.weight": {"weight": [K], "density": [K]},
    })

Tensors are named as their executor addresses them: Flax paths in memory, where a stacked
parameter carries a layer axis (per-source values [K, L], merge-wide ones [L]); checkpoint
keys when streamed, one per layer (per-source [K], merge-wide []). The method and its
options are static; the values are a pytree of arrays, so a population of plans is data
(vmapped, never a recompilation per candidate).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np

from jaxmerge.merge.methods import MergeMethod, Options, get_method

Params = Mapping[str, Mapping[str, jax.Array]]  # tensor -> {parameter: value}
Scope = tuple[str, dict]  # (where, {parameter: mergekit setting}): a source's, a slice's or a recipe's parameters


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the key at fault."""


@dataclasses.dataclass(frozen=True)
class MergePlan:
    method: str  # a registered method's name
    options: Options  # the method's static switches (normalize, rescale)
    params: Params  # per tensor: per-source values [K] ([K, L] stacked), merge-wide [] ([L]); float32
    # (a recipe's: float64, see `tensor_params`)

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    def with_sources(self, kept: list[int]) -> MergePlan:
        """The plan for the sources `kept` (indices) alone: their per-source values, in that order."""
        per_source = {p.name for p in self.merge_method.parameters if p.per_source}
        return dataclasses.replace(self, params={
            tensor: {n: v[np.asarray(kept, int)] if n in per_source else v for n, v in values.items()}
            for tensor, values in self.params.items()})


jax.tree_util.register_dataclass(MergePlan, data_fields=["params"], meta_fields=["method", "options"])


# ----------------------------------------------------------------------------- from mergekit's settings


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


def resolve_setting(name: str, scopes: list[Scope], tensor_name: str, t: float, default, required_for: str):
    """A parameter's value for one tensor: from the first scope whose setting matches it, else
    its default (required if None)."""
    for where, params in scopes:
        if name in params:
            value = evaluate_setting(params[name], tensor_name, t, f"{where}.parameters.{name}")
            if value is not None:
                return value
    if default is None:
        raise RecipeError(f"missing parameter {name!r} for {required_for} (tensor {tensor_name})")
    return default


def plan_options(method: MergeMethod, scopes: list[Scope]) -> Options:
    """The method's options as mergekit settings (`normalize`, `rescale`) in `scopes` give them."""
    defaults = method.default_options
    normalize = resolve_setting("normalize", scopes, "", 0.0, defaults.normalize, "the merge")
    rescale = resolve_setting("rescale", scopes, "", 0.0, defaults.rescale is not None, "the merge")
    return dataclasses.replace(defaults, normalize=bool(normalize), rescale="l1" if rescale else None)


def tensor_params(method: MergeMethod, sources: list[tuple[str, list[Scope]]], scopes: list[Scope],
                  tensor_name: str, t: float) -> dict:
    """One tensor's values in a plan, as mergekit settings give them: per source [K] from
    each (model, its scopes), merge-wide [] from `scopes`. Float64, the recipe's own values:
    the disk-to-disk merge counts the entries mergekit keeps from them (int(density * size)
    in Python floats, `methods.exact_counts`) and passes float32 to the methods."""
    params = {}
    for p in method.parameters:
        if p.per_source:
            values = [resolve_setting(p.name, own, tensor_name, t, p.default, model) for model, own in sources]
        else:
            values = resolve_setting(p.name, scopes, tensor_name, t, p.default, "the merge")
        params[p.name] = np.asarray(values, np.float64)
    return params
