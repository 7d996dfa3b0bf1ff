"""Loads a checkpoint sharded over 4 host devices (each process reading only its slices)
and compares it with a plain load; prints JSON. Run with 4 host devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_load_job.py MODEL_DIR
"""

import json
import sys

import jax
import numpy as np
from flax import nnx

import jaxmerge
from jaxmerge.parallel import Layout

plain = jaxmerge.load(sys.argv[1])
sharded = jaxmerge.load(sys.argv[1], sharding=Layout(1, 4).mesh())
leaves = [(jax.tree_util.keystr(p), a, b) for (p, a), (_, b) in zip(
    jax.tree_util.tree_flatten_with_path(nnx.state(plain))[0],
    jax.tree_util.tree_flatten_with_path(nnx.state(sharded))[0], strict=True)]
ids = np.array([[1, 5, 7, 9, 11]])
print(json.dumps({"equal": all(a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
                               for _, a, b in leaves),
                  "specs": {name: str(b.sharding.spec) for name, _, b in leaves},
                  "logits_difference": float(np.abs(np.asarray(plain(ids), np.float32)
                                                    - np.asarray(sharded(ids), np.float32)).max())}))
