"""A found genome as a mergekit YAML recipe and as a merged HF checkpoint.

A genome's recipe is its merge plan (`GenomeSpace.plan`) written as YAML (`recipe_yaml`),
for the sources it uses (those a gate left out are omitted). One value per source becomes
a plain `models:` recipe; per-layer values become one slice per layer (mergekit's
gradients interpolate linearly, a genome's layer groups are steps), and the embeddings /
final norm / output head take their own values through tensor-name filters. Values are
written as the shortest decimals that give the plan's float32 values back. A model in the
Hugging Face cache is named by its reference pinned to its commit (`org/name@<commit>`), so
the recipe reruns on exactly those weights wherever that commit can be fetched.

A random method's recipe (DARE, DELLA) also carries the seed its masks were drawn from, as
the top-level key `jaxmerge_seed` (`merge.recipe.SEED_KEY`; mergekit ignores keys it does not know):
`jaxmerge merge` reads it and draws every tensor's masks from it as the in-memory merge
does (`merge.tree.merge_plan` with `jax.random.key(seed)`), so the recipe rebuilds the
merged checkpoint bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxmerge.hub import pinned_name
from jaxmerge.merge import MergePlan, flat_params, merge_plan, stack_sources, with_params
from jaxmerge.merge.recipe import SEED_KEY
from jaxmerge.merge.tree import is_stacked
from jaxmerge.saving import save
from jaxmerge.search.genome import GenomeSpace

log = logging.getLogger(__name__)

_NON_LAYER_FILTERS = ("embed_tokens", "lm_head", "model.norm.")


def _number(value) -> float:
    """A plan's float32 value as the shortest decimal that reads back as that float32."""
    return float(str(np.float32(value)))


def _family_of(path: str, families: tuple[str, ...]) -> str | None:
    return next((f for f in families if f in path), None)


def _representatives(plan: MergePlan, families: tuple[str, ...]) -> tuple[dict, str | None]:
    """A stacked tensor per family with one (None: the tensors of no family), and a non-layer
    tensor: those whose values the recipe writes (every tensor of a class has the same)."""
    stacked: dict = {}
    for path in sorted(plan.params):
        if is_stacked(path):
            stacked.setdefault(_family_of(path, families), path)
    non_layer = sorted((_family_of(p, families) is not None, p) for p in plan.params if not is_stacked(p))
    return stacked, non_layer[0][1] if non_layer else None


def _setting(values: list[tuple[str | None, float]]):
    """mergekit's value of a parameter: a number, or {filter, value} entries when the filtered
    tensors (filter None: every other one) have values of their own."""
    if len({v for _, v in values}) == 1 and values[-1][0] is None:
        return values[-1][1]
    return [{"filter": f, "value": v} if f is not None else {"value": v} for f, v in values]


def _value(plan: MergePlan, path: str, name: str, source: int | None, layer: int) -> float:
    """A per-source parameter's value ([K, L] stacked, [K] not), or (source None) a merge-wide
    one's ([L] stacked, a scalar not)."""
    v = np.asarray(plan.params[path][name], np.float64)
    if source is not None:
        v = v[source]
    return _number(v[layer] if v.ndim == 1 else v)


def _settings(plan: MergePlan, families: tuple[str, ...], stacked: dict, non_layer: str | None, per_layer: bool,
              per_source: bool, source: int | None, layer: int) -> dict:
    """The values of a source's parameters (per_source) or of the merge-wide ones (source
    None), as mergekit settings: non-layer tensors' (per layer only), families', the rest's."""
    params = {}
    for p in (p for p in plan.merge_method.parameters if p.per_source == per_source):
        values = [(f, _value(plan, non_layer, p.name, source, 0)) for f in _NON_LAYER_FILTERS] \
            if per_layer and non_layer else []
        values += [(f, _value(plan, stacked[f], p.name, source, layer)) for f in families if f in stacked]
        default = stacked.get(None) or (non_layer if non_layer and _family_of(non_layer, families) is None else None)
        if default is not None:
            values.append((None, _value(plan, default, p.name, source, layer)))
        if values:
            params[p.name] = _setting(values)
    return params


def recipe_yaml(plan: MergePlan, base: str, sources: list[str], *, families: tuple[str, ...] = (),
                per_layer: bool = False, dtype: str = "float32", seed: int | None = None) -> str:
    """The plan (over Flax paths, `sources` its sources in order) as a mergekit recipe that
    `jaxmerge merge` and mergekit run to the plan's merge. families: tensor-name filters whose
    tensors have values of their own (first match wins, as mergekit's filters); per_layer: one
    slice per layer with the layers' own values, else the values of layer 0 for every layer;
    seed: for a random method, the seed its merge drew from (written as `jaxmerge_seed`)."""
    method = plan.merge_method
    base, sources = pinned_name(base), [pinned_name(s) for s in sources]
    stacked, non_layer = _representatives(plan, families)
    per_source = {p.name: p.per_source for p in method.parameters}
    num_layers = max((np.shape(v)[-1] for path in stacked.values() for name, v in plan.params[path].items()
                      if np.ndim(v) == 1 + per_source.get(name, True)), default=1)  # [K, L] or, merge-wide, [L]

    def parameters(per_source: bool, source: int | None, layer: int) -> dict:
        return _settings(plan, families, stacked, non_layer, per_layer, per_source, source, layer)

    # Merge-wide parameters (slerp's t, sce's select_topk) are the slice's (per layer) or the
    # recipe's: mergekit reads them there, not among a model's own.
    recipe: dict = {"merge_method": plan.method, "base_model": base}
    merge_wide = parameters(False, None, 0)
    if not per_layer:
        recipe["models"] = [{"model": src, "parameters": parameters(True, i, 0)} for i, src in enumerate(sources)]
    else:
        recipe["slices"] = []
        for layer in range(num_layers):
            slice_ = {"sources": [{"model": base, "layer_range": [layer, layer + 1]}] + [
                {"model": src, "layer_range": [layer, layer + 1], "parameters": parameters(True, i, layer)}
                for i, src in enumerate(sources)]}
            if merge_wide:
                slice_["parameters"] = parameters(False, None, layer)
            recipe["slices"].append(slice_)
        merge_wide = {}
    if plan.options.normalize != method.default_options.normalize:
        merge_wide["normalize"] = plan.options.normalize
    if merge_wide:
        recipe["parameters"] = merge_wide
    recipe["dtype"] = dtype
    if seed is not None and method.random:
        recipe[SEED_KEY] = int(seed)
    return yaml.safe_dump(recipe, sort_keys=False)


def genome_recipe(space: GenomeSpace, genome, base: str, sources: list[str], paths, dtype: str = "float32",
                  seed: int | None = None) -> str:
    """The recipe of a genome: its plan over the model's Flax `paths`, for the sources it uses
    (all of them if it uses none: the merge is then the base), written by `recipe_yaml`
    (`seed`: a random method's, see there). Round the genome first (`GenomeSpace.rounded`)
    for a recipe of short numbers."""
    genome = jnp.asarray(genome, jnp.float32)
    used = np.asarray(space.sources_used(genome))
    kept = [i for i in range(len(sources)) if used[i]] or list(range(len(sources)))
    plan = space.plan(genome, sorted(paths)).with_sources(kept)
    if seed is not None and plan.merge_method.random and kept != list(range(len(kept))):
        # a source's masks are drawn from its position among the sources (merge.methods)
        log.warning("the recipe leaves out sources before the last one it uses: jaxmerge merge of it draws "
                    "other %s masks than the merge of the genome did", plan.method)
    return recipe_yaml(plan, base, [sources[i] for i in kept], families=space.families,
                       per_layer=space.num_groups > 1, dtype=dtype, seed=seed)


def save_merged(space: GenomeSpace, genome, base_model, source_models, out_dir, *, base_path: str,
                source_paths: list[str], seed: int = 0, **save_kwargs) -> Path:
    """Merges with the genome's recipe and writes the checkpoint plus `mergekit_config.yml`.
    The genome's values are rounded to the recipe's six decimals first, so that the
    checkpoint and the YAML agree; a random method draws from `jax.random.key(seed)`, and
    its recipe carries the seed (`jaxmerge merge` of it rebuilds the checkpoint bit for bit)."""
    genome = space.rounded(genome)
    base = flat_params(base_model)
    text = genome_recipe(space, genome, base_path, source_paths, sorted(base), seed=seed)
    sources = stack_sources(base, [flat_params(m) for m in source_models])
    plan = space.plan(genome, sorted(base))
    merged = merge_plan(plan, base, sources, key=jax.random.key(seed) if plan.merge_method.random else None)
    return save(with_params(base_model, merged), out_dir, extra_files={"mergekit_config.yml": text},
                inputs=[base_path, *source_paths], **save_kwargs)
