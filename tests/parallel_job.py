"""The search problem of search_problem.py on device meshes, as a job: for each layout, the
search in OUT/LAYOUT, and a line of JSON on stdout with its result and where the arrays lived
(one process for several layouts: each layout's search starts from an empty compilation cache).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_job.py OUT GENERATIONS 1x1 8x1
With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, it joins a
multi-process run first.
"""

import json
import os
import sys

if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    from jaxmerge import parallel

    parallel.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from search_problem import SPACE, make_problem, score  # noqa: E402

from jaxmerge.parallel import Layout, shard_data  # noqa: E402
from jaxmerge.search import SearchConfig, evaluate_population, run_search  # noqa: E402


def main(out_dir, layout, generations):
    evaluate_population.clear_cache()  # "compiled": this layout's programs
    layout = Layout.parse(layout)
    data, masks, validation = make_problem()
    config = SearchConfig(generations=generations, population_size=8, seed=3, layout=layout)
    result = run_search(SPACE, sorted(data["base"]), score, data, masks, validation, config=config,
                        out_dir=out_dir, progress=False)
    placed = shard_data(data, layout.mesh())
    specs = {path: str(leaf.sharding.spec) for path, leaf in
             ((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(placed)[0])}
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
                      "best_genome": np.asarray(result.best_genome).tolist(), "best_validation": result.best_validation,
                      "history": [{k: v for k, v in h.items() if k != "seconds"} for h in result.history],
                      "specs": specs, "compiled": evaluate_population._cache_size()}))


if __name__ == "__main__":
    for layout in sys.argv[3:]:
        main(os.path.join(sys.argv[1], layout), layout, int(sys.argv[2]))
