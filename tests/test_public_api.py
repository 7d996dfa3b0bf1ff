"""What `import jaxmerge` documents exists, and a plain import stays light."""

from __future__ import annotations

import subprocess
import sys

import jaxmerge


def test_every_documented_name_resolves():
    for name in jaxmerge.__all__:
        assert getattr(jaxmerge, name) is not None, name
    for module in ("architectures", "eval", "merge", "models", "pipeline", "search", "testing"):
        assert getattr(jaxmerge, module).__name__ == f"jaxmerge.{module}"
        assert f"`{module}`" in jaxmerge.__doc__ or f".{module}" in jaxmerge.__doc__, module
    for name in jaxmerge.__all__:
        assert name in jaxmerge.__doc__ or name in ("CheckpointError", "EvolveResult", "GenomeConfig", "DfsSettings",
                                                     "SearchSettings", "ConfigError", "SearchResult", "TaskData"), name
    assert set(jaxmerge.__all__) <= set(dir(jaxmerge))


def test_a_plain_import_loads_neither_evosax_nor_the_search():
    """evosax starts JAX's backend on import, which a multi-host process must not do before
    `jax.distributed.initialize()`; `jaxmerge merge` needs neither it nor orbax."""
    code = ("import sys, jaxmerge; jaxmerge.merge_params; "
            "print(sorted(m for m in ('evosax', 'orbax.checkpoint', 'jaxmerge.search') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
