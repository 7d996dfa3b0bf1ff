"""The README's library example runs as written (on tiny models standing in for 7B ones)."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import jaxmerge
from conftest import make_hf_model, random_ids

README = Path(__file__).parent.parent / "README.md"


def test_library_example(tmp_path, monkeypatch):
    code = re.search(r"<!-- library-example -->\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    paths = []
    for i in range(3):
        model = make_hf_model("mistral_gqa", seed=0 if i == 0 else i)
        model.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    code = re.sub(r"paths = \[.*?\]", f"paths = {paths!r}", code)
    monkeypatch.chdir(tmp_path)
    namespace = {"input_ids": jnp.asarray(random_ids(2, 6))}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["logits"].shape == (2, 6, 96)
    saved = jaxmerge.load(tmp_path / "out" / "merged")
    np.testing.assert_allclose(np.asarray(saved(namespace["input_ids"])), np.asarray(namespace["logits"]), atol=1e-4)
