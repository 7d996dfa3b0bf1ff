"""A found genome as a mergekit YAML recipe and as a merged HF checkpoint.

One value per source becomes a plain `models:` recipe (sources a gate left out are omitted).
Per-layer-group values become one slice per layer (mergekit's gradients interpolate
linearly, groups are steps), and the embeddings / final norm / output head take their own
group through tensor-name filters.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from jaxmerge.checkpoint import save
from jaxmerge.merge import flat_params, merge_params, stack_sources, with_params
from jaxmerge.merge.methods import get_method
from jaxmerge.search.genome import GenomeSpace

_NON_LAYER_FILTERS = ("embed_tokens", "lm_head", "model.norm.")


def _held_parameters(space: GenomeSpace) -> tuple[dict, dict]:
    """Parameters not evolved: (per source, merge-wide), defaults and fixed values."""
    method = get_method(space.method)
    held = {p.name: p.default for p in method.parameters if p.name not in space.evolve}
    held.update(dict(space.fixed))
    per_source = {n: float(v) for n, v in held.items() if method.parameter(n).per_source}
    merge_wide = {n: float(v) for n, v in held.items() if not method.parameter(n).per_source}
    return per_source, merge_wide


def recipe_yaml(space: GenomeSpace, genome, base: str, sources: list[str], dtype: str = "float32") -> str:
    values = {key: np.asarray(v, np.float64) for key, v in space.values(jnp.asarray(genome)).items()}
    per_source, merge_wide = _held_parameters(space)
    if space.normalize is not None:
        merge_wide["normalize"] = space.normalize

    def value(name: str, source: int, group: int, non_layer: bool):
        """A parameter's value for one source: a number, or mergekit's filter list when
        tensor families (or the non-layer group) have values of their own."""
        def at(key, g):
            return round(float(values[key][source, g]), 6)
        entries = [{"filter": f, "value": at(name, -1)} for f in _NON_LAYER_FILTERS] if non_layer else []
        entries += [{"filter": f, "value": at(f"{name}[{f}]", group)} for f in space.families]
        return entries + [{"value": at(name, group)}] if entries else at(name, group)

    # Sources a gate left out (weight 0: the same merge as without them) are not in the recipe,
    # so mergekit never loads them; unless every one is out (the merge is then the base).
    present = values.get("present", np.ones((len(sources), 1)))[:, 0] > 0
    kept = [(i, src) for i, src in enumerate(sources) if present[i]] or list(enumerate(sources))
    recipe: dict = {"merge_method": space.method, "base_model": base}
    if space.num_groups == 1:
        recipe["models"] = [{"model": src, "parameters": {**per_source, **{n: value(n, i, 0, False)
                                                                        for n in space.evolve}}}
                            for i, src in kept]
    else:
        groups = space.layer_group_index()
        slices = []
        for layer in range(space.num_layers):
            entries = [{"model": base, "layer_range": [layer, layer + 1]}]
            for i, src in kept:
                params = {**per_source, **{n: value(n, i, int(groups[layer]), True) for n in space.evolve}}
                entries.append({"model": src, "layer_range": [layer, layer + 1], "parameters": params})
            slices.append({"sources": entries})
        recipe["slices"] = slices
    if merge_wide:
        recipe["parameters"] = merge_wide
    recipe["dtype"] = dtype
    return yaml.safe_dump(recipe, sort_keys=False)


def save_merged(space: GenomeSpace, genome, base_model, source_models, out_dir, *, base_path: str,
                source_paths: list[str], key=None, **save_kwargs) -> Path:
    """Merges with the genome's recipe and writes the checkpoint plus `mergekit_config.yml`.
    The genome's values are rounded to the recipe's six decimals first, so that the
    checkpoint and the YAML agree."""
    text = recipe_yaml(space, genome, base_path, source_paths)
    base = flat_params(base_model)
    sources = stack_sources(base, [flat_params(m) for m in source_models])
    params = space.decode(jnp.asarray(np.round(np.asarray(genome, np.float64), 6), jnp.float32), sorted(base))
    merged = merge_params(space.method, base, sources, params, key=key, options=space.options())
    return save(with_params(base_model, merged), out_dir, extra_files={"mergekit_config.yml": text},
                inputs=[base_path, *source_paths], **save_kwargs)
