"""A single NaN, +inf or -inf anywhere in an input is refused, naming the file and tensor:
by `jaxmerge merge` (streaming, every method) and by `jaxmerge.load` (the in-memory path).

Issue #24: the streaming check took max/min of each tensor, relying on NaN propagating
through them, which XLA-CPU's reductions of 4096 elements or more do not: a NaN anywhere
but where the reduction happened to see it was merged into the output (or silently dropped
by a sparsifier). So the positions here are random, and the tensors big enough to matter.
"""

from __future__ import annotations

import shutil
import zlib

import numpy as np
import pytest
from conftest import make_hf_model
from safetensors.numpy import load_file
from test_input_validation import rewrite_tensors

import jaxmerge
from jaxmerge import CheckpointError
from jaxmerge.cli import main
from jaxmerge.merge.methods import get_method, method_names

KINDS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
# Per-source values of the methods' parameters (the others keep their defaults).
VALUES = {"weight": 0.5, "density": 0.6, "scale": 1.0}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and two fine-tunes, float32, every weight matrix 64 x 64 (4096 values: as large
    as XLA-CPU's max/min needed to miss a NaN)."""
    root = tmp_path_factory.mktemp("family")
    for seed, name in enumerate(("base", "ft0", "ft1")):
        make_hf_model("mistral_gqa", seed=seed, hidden_size=64, intermediate_size=64,
                      num_key_value_heads=4, num_hidden_layers=2).save_pretrained(root / name)
    return root


def poisoned(family, tmp_path, model: str, key: str, position: tuple[int, ...], value: float):
    """A copy of `model` with one value of tensor `key` replaced; returns (directory, file)."""
    directory = shutil.copytree(family / model, tmp_path / f"{model}-poisoned")
    path = rewrite_tensors(directory / "model.safetensors", lambda t: t[key].__setitem__(position, value))
    return directory, path


def recipe(method_name: str, family, replace: dict) -> str:
    """A mergekit recipe of `method_name` over the family (base, ft0, ft1 as the method takes
    them), with the directories in `replace` substituted."""
    method = get_method(method_name)
    where = {name: replace.get(name, family / name) for name in ("base", "ft0", "ft1")}
    sources = ["ft0"] if method.max_sources == 1 else ["ft0", "ft1"]
    text = f"merge_method: {method_name}\n"
    if method.base == "required":
        text += f"base_model: {where['base']}\n"
    text += "models:\n"
    for name in sources:
        values = {p.name: VALUES[p.name] for p in method.parameters if p.per_source and p.name in VALUES}
        text += f"  - model: {where[name]}\n" + (f"    parameters: {values}\n".replace("'", "") if values else "")
    if any(p.name == "t" for p in method.parameters):
        text += "parameters: {t: 0.5}\n"
    return text + "dtype: float32\n"


def inputs_of(method_name: str) -> list[str]:
    method = get_method(method_name)
    return (["base"] if method.base == "required" else []) + (["ft0"] if method.max_sources == 1 else ["ft0", "ft1"])


def refused(family, tmp_path, capsys, method: str, model: str, key: str, position, value) -> None:
    """Poisons one value; asserts that `jaxmerge merge` and `jaxmerge.load` both refuse it."""
    directory, path = poisoned(family, tmp_path, model, key, position, value)
    counts = "1 NaN and 0 Inf" if np.isnan(value) else "0 NaN and 1 Inf"
    (tmp_path / "r.yml").write_text(recipe(method, family, {model: directory}))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2, (method, model, key, position)
    err = capsys.readouterr().err
    assert f"{path}: tensor {key} holds {counts} among its" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=rf"{path}: tensor {key} holds {counts} among its"):
        jaxmerge.load(directory)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", method_names())
def test_a_non_finite_value_at_a_random_position_is_refused(family, tmp_path, capsys, method, kind):
    """One value, drawn uniformly among all the values of one random input."""
    rng = np.random.default_rng(zlib.crc32(f"{method} {kind}".encode()))
    model = str(rng.choice(inputs_of(method)))
    tensors = load_file(family / model / "model.safetensors")
    keys = sorted(tensors)
    sizes = np.array([tensors[k].size for k in keys])
    key = keys[rng.choice(len(keys), p=sizes / sizes.sum())]
    position = tuple(int(i) for i in np.unravel_index(int(rng.integers(tensors[key].size)), tensors[key].shape))
    refused(family, tmp_path, capsys, method, model, key, position, KINDS[kind])


@pytest.mark.parametrize("position", [(1, 2), (0, 1), (32, 7), (63, 63)])
def test_nan_inside_a_q_proj_is_refused(family, tmp_path, capsys, position):
    """The positions of the report (#24): a task-arithmetic merge wrote these NaN out."""
    refused(family, tmp_path, capsys, "task_arithmetic", "ft0", "model.layers.0.self_attn.q_proj.weight",
            position, np.nan)


# A finite value that a cast or the merge itself turns into inf: the recipe's fault, said so.
OVERFLOWS = {
    "input": (2e5, "dtype: float32\n", "dtype: float16\n", "tensor {key} of {model}: overflows float16"),
    "output": (2e5, "dtype: float32\n", "dtype: float32\nout_dtype: float16\n",
               "tensor {key} overflows float16: values beyond its range would be written as inf"),
    "merge": (3e38, "dtype: float32\n", "dtype: float32\nparameters: {lambda: 4.0}\n",
              "tensor {key}: the merge in float32 gives inf or NaN"),
}


@pytest.mark.parametrize("fault", OVERFLOWS)
def test_a_finite_value_that_overflows_at_a_random_position_is_refused(family, tmp_path, capsys, fault):
    value, old, new, message = OVERFLOWS[fault]
    rng = np.random.default_rng(zlib.crc32(fault.encode()))
    tensors = load_file(family / "ft0" / "model.safetensors")
    key = str(rng.choice([k for k in sorted(tensors) if tensors[k].ndim == 2]))
    position = tuple(int(rng.integers(n)) for n in tensors[key].shape)
    directory, _ = poisoned(family, tmp_path, "ft0", key, position, value)
    (tmp_path / "r.yml").write_text(recipe("task_arithmetic", family, {"ft0": directory}).replace(old, new))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2, (fault, key, position)
    assert message.format(key=key, model=directory) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
