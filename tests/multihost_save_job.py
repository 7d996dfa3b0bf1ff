"""Two processes x 2 host devices (jax.distributed on localhost): load a checkpoint sharded
over the 4 devices of both, so that no process holds whole arrays, and save it. Prints
JSON (the last line of stdout).

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multihost_save_job.py MODEL OUT
"""

import json
import sys

from jaxmerge import parallel

parallel.initialize()

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmerge  # noqa: E402
from jaxmerge.parallel import Layout  # noqa: E402

model = jaxmerge.load(sys.argv[1], sharding=Layout(1, 4).mesh())
leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
out = jaxmerge.save(model, sys.argv[2])
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "sharded_across_processes": sum(not leaf.is_fully_addressable for leaf in leaves),
                  "written_when_returned": (out / "config.json").exists()}))
