"""A small natural-niches problem with a known answer, importable by tests and runnable as a
job: two specialists, each a target model on half of the parameters' items; a child split in
the middle (A before, B after) solves all of them.

    python tests/niche_problem.py OUT_DIR GENERATIONS [LAYOUT ...]

With layouts (POPULATIONxMODEL, e.g. 1x1 2x2), one search per layout in OUT_DIR/LAYOUT and a
line of JSON on stdout with its result (run with XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from search_problem import strip_times

from jaxmerge.parallel import Layout
from jaxmerge.search.natural_niches import NicheConfig, parameter_order
from jaxmerge.search.niche_search import NicheSearchConfig, run_natural_niches

ITEMS = 8  # items 0-3 test the first half of the parameters (skill A), 4-7 the second (skill B)
FITNESS = {"difficulty": jnp.linspace(1.0, 8.0, ITEMS)}
VALIDATION = {"difficulty": jnp.full(ITEMS, 4.0)}


def make_world():
    """(sources, data, order): source 0 is target A everywhere, source 1 target B. An item
    scores how close a model is to its skill's target on its half of the parameters (in the
    layer-major order)."""
    key = jax.random.key(0)
    shapes = {"embed_tokens.weight": (6, 4), "layers.mlp.up_proj.kernel": (2, 4, 4), "norm.weight": (4,)}
    target = [{p: jax.random.normal(jax.random.fold_in(key, 10 * t + i), s) for i, (p, s) in enumerate(shapes.items())}
              for t in range(2)]
    sources = [dict(target[0]), dict(target[1])]
    order = parameter_order(sources[0])
    return sources, {"targets": [flatten(t, order) for t in target]}, order


def flatten(model, order):
    """The parameters as one vector in the layer-major order."""
    return jnp.concatenate([(model[path][layer] if layer >= 0 else model[path]).reshape(-1)
                            for path, layer in order.blocks])


def score_fn(order):
    def score(child, data, batch, key):  # [I] in [0, 1]
        x, half = flatten(child, order), order.num_params // 2
        first = jnp.mean((x[:half] - data["targets"][0][:half]) ** 2)
        second = jnp.mean((x[half:] - data["targets"][1][half:]) ** 2)
        return jnp.exp(-jnp.concatenate([jnp.full(4, first), jnp.full(4, second)]) * batch["difficulty"])
    return score


def search(out_dir, generations, **config):
    sources, data, order = make_world()
    niches = NicheConfig(archive_size=4, interpolation=config.pop("interpolation", "slerp"))
    return run_natural_niches(sources, score_fn(order), data, FITNESS, VALIDATION,
                              config=NicheSearchConfig(generations=generations, children=3, niches=niches, seed=1,
                                                       **config),
                              out_dir=out_dir, progress=False, source_names=["skill_a", "skill_b"])


if __name__ == "__main__":
    out, generations, layouts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if not layouts:
        search(out, generations)
    for layout in layouts:
        result = search(os.path.join(out, layout), generations, layout=Layout.parse(layout),
                        interpolation=os.environ.get("NICHE_INTERPOLATION", "slerp"))
        print(json.dumps({"layout": layout, "devices": jax.device_count(), "history": strip_times(result.history),
                          "member_ids": result.member_ids, "best_id": result.best_id,
                          "best": {p: np.asarray(v).tolist() for p, v in result.best_params.items()}}))
