"""mergekit's own recipes as a test suite: the example recipes of mergekit's repository
(examples/*.yml) and the configurations of its tests/test_basic_merges.py, on tiny generated
checkpoints, through `jaxmerge merge --ties torch` (mergekit's choice among tied entries) and
through mergekit 0.1.5 in this process (its `run_merge`, what mergekit-yaml runs: a command
per recipe would cost most of this file's time), compared bit for bit.

Each recipe keeps its original text (keys, parameters, filters, gradients, slices, normalize,
int8_mask, dtype); the model names are replaced, by a map, with members of a family of a base
and three fine-tunes of the right architecture (Llama 2; Mistral for bio-merge.yml), 4 layers,
every matrix 64 x 64, and layer ranges are scaled to those 4 layers (a comment per recipe says
what was rewritten). The families are stored in float32, bfloat16 and float16, their values on
a coarse grid so that TIES and breadcrumbs cut runs of tied |task vector| entries (as in
tests/test_merge_dtype_semantics.py); each recipe runs on one or more of them, rotating, so
that every deterministic method of mergekit's first set (linear, task_arithmetic, ties,
breadcrumbs, slerp, model_stock, passthrough) meets each storage dtype at least once.

Here, from examples/: linear.yml, ties.yml (mergekit 0.1.x's: density and weight gradients,
a filtered weight, normalize, int8_mask), bio-merge.yml, gradient-slerp.yml,
orcamini-platy-44layer.yml, arcee_fusion.yml. From test_basic_merges.py: test_passthrough_scale,
test_linear_merge, test_slerp_merge, test_nuslerp_merges (its nine configurations),
test_task_arithmetic_merge, test_breadcrumbs_merge, test_ties_merge, test_sce_merge,
test_multislerp_merge, test_model_stock_merge, test_model_stock_filterwise_merge,
test_arcee_fusion_merge, test_nearswap_merge, test_karcher_merge, and test_dare_ties_merge and
test_della_merge, whose random masks differ from mergekit's: their share of entries moved and
mean change (DARE's rescaling) are compared instead. The newer methods (nuslerp, multislerp,
karcher, sce, nearswap, arcee_fusion) run in float32, their `dtype: bfloat16` rewritten: their
half precision is tests/test_merge_more_methods.py's. breadcrumbs_ties, dare_linear and
della_linear appear in none of these recipes (tests/test_merge_dtype_semantics.py and
tests/test_merge_mergekit.py have them).

Left out: mega.yml (several recipes in one file, stages of a pipeline, not one mergekit-yaml
recipe), linear_small.yml (no merge_method: a metrics configuration), metrics-*.yml (metric
configurations), evo_bert_large.yml (mergekit-evolve), whisper-*.yml, vlm-*.yml and the VLM
configurations of test_basic_merges.py (Whisper and LLaVA-style architectures),
gpt2-small.yml, test_gpt2_copy and test_gpt2_stack (GPT-2, which jaxmerge does not load),
cabs.yml, chipalign.yml, core_space.yml, lrp.yml, zipit.yml and the ranked_ties version of
ties.yml (methods mergekit 0.1.5 lacks).

Tolerances, each where an existing test documents it: slerp 1 ulp in half precision (its
coefficients differ in their last float32 bit; see `assert_slerp_bits` for a result that
cancels); the newer methods the bounds of tests/test_merge_more_methods.py (`compare`: ulps of
a tensor's largest entry; arcee_fusion's rare entries on the other side of its threshold).
Everything else: bits.
"""

import copy
import shutil
import textwrap

import numpy as np
import pytest
import torch
import yaml
from conftest import tied_family
from test_merge_dtype_semantics import assert_bits, mergekit, ulps
from test_merge_mergekit import read
from test_merge_more_methods import ULPS, compare

from jaxmerge import cli

pytestmark = pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit not installed")

STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Every matrix 64 x 64 (vocabulary, width and MLP alike; Mistral's grouped keys and values 32 x
# 64): few shapes, so few programs to compile, which is most of a merge's time here.
WIDTH = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=64, vocab_size=64)
# Llama 2 (orca_mini, Platypus2, WizardLM, mergekit's picollama): full multi-head attention,
# separate output head, RoPE base 10000. Mistral 7B: grouped-query attention.
ARCHITECTURES = {"llama": ("llama_tied_theta", dict(tie_word_embeddings=False, rope_theta=10_000.0, **WIDTH)),
                 "mistral": ("mistral_gqa", WIDTH)}


def write_family(root, architecture: str, storages) -> None:
    """A base and three fine-tunes, each stored in every one of `storages` (root/<dtype>/): the
    base on a 2^-10 grid, ft0's and ft1's task vectors on a 2^-9 grid (few levels: ties at every
    cut), ft2's continuous."""
    name, shape = ARCHITECTURES[architecture]
    for i, model in enumerate(tied_family(name, **shape)):
        for storage in storages:
            stored = copy.deepcopy(model).to(STORAGE[storage])  # .to changes a module in place
            stored.save_pretrained(root / storage / ("base" if i == 0 else f"ft{i - 1}"))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    write_family(root / "llama", "llama", STORAGE)
    write_family(root / "mistral", "mistral", ["bfloat16"])
    return root


def rewrite(recipe: str, names: dict, directory) -> str:
    """The recipe with each model name the map knows replaced by that family member's path."""
    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return str(directory / names[node]) if isinstance(node, str) and node in names else node
    return yaml.safe_dump(walk(yaml.safe_load(textwrap.dedent(recipe))), sort_keys=False)


def run_both(recipe_text: str, tmp_path):
    (tmp_path / "recipe.yml").write_text(recipe_text)
    assert cli.main(["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "ours"), "--quiet", "--ties", "torch"]) == 0
    mergekit(recipe_text, tmp_path / "theirs")
    return read(tmp_path / "ours"), read(tmp_path / "theirs")


# ----------------------------------------------------------------------------- mergekit's examples/

# mergekit's example model names, each the family member that plays its part.
EXAMPLE_NAMES = {
    # linear.yml, gradient-slerp.yml, orcamini-platy-44layer.yml, ties.yml (Llama 2 13B)
    "TheBloke/Llama-2-13B-fp16": "base",
    "psmathur/orca_mini_v3_13b": "ft0",
    "WizardLM/WizardLM-13B-V1.2": "ft1",
    "WizardLM/WizardMath-13B-V1.0": "ft1",
    "garage-bAInd/Platypus2-13B": "ft2",
    # bio-merge.yml (Mistral 7B)
    "mistralai/Mistral-7B-v0.1": "base",
    "mistralai/Mistral-7B-Instruct-v0.2": "ft0",
    "BioMistral/BioMistral-7B": "ft2",
    # arcee_fusion.yml
    "model_a": "base",
    "model_b": "ft2",
}

# name: (architecture, recipe text as in mergekit's examples/, with the rewrites its comment names)
EXAMPLES = {
    "linear.yml": ("llama", """
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              weight: 1.0
          - model: WizardLM/WizardLM-13B-V1.2
            parameters:
              weight: 0.3
          - model: garage-bAInd/Platypus2-13B
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
    """),
    "ties.yml": ("llama", """
        models:
          - model: psmathur/orca_mini_v3_13b
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: garage-bAInd/Platypus2-13B
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1] # weight gradient
          - model: WizardLM/WizardMath-13B-V1.0
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: TheBloke/Llama-2-13B-fp16
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
    """),
    "bio-merge.yml": ("mistral", """
        models:
          - model: mistralai/Mistral-7B-Instruct-v0.2
            parameters:
              density: 0.5
              weight: 0.5
          - model: BioMistral/BioMistral-7B
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: mistralai/Mistral-7B-v0.1
        parameters:
          normalize: false
          int8_mask: true
        dtype: float16
    """),
    # layer_range [0, 40] of 40 layers: [0, 4] of 4.
    "gradient-slerp.yml": ("llama", """
        slices:
          - sources:
              - model: psmathur/orca_mini_v3_13b
                layer_range: [0, 4]
              - model: garage-bAInd/Platypus2-13B
                layer_range: [0, 4]
        merge_method: slerp
        base_model: psmathur/orca_mini_v3_13b
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5 # fallback for rest of tensors
        dtype: float16
    """),
    # layer_range [0, 24] and [20, 40] of 40 layers (44, four repeated): [0, 3] and [2, 4] of 4
    # (5, one repeated).
    "orcamini-platy-44layer.yml": ("llama", """
        slices:
          - sources:
            - model: psmathur/orca_mini_v3_13b
              layer_range: [0, 3]
          - sources:
            - model: garage-bAInd/Platypus2-13B
              layer_range: [2, 4]
        merge_method: passthrough
        dtype: float16
    """),
    # dtype: bfloat16 rewritten to float32 (the newer methods' half precision is
    # tests/test_merge_more_methods.py's).
    "arcee_fusion.yml": ("llama", """
        models:
          - model: model_a
          - model: model_b
        merge_method: arcee_fusion
        base_model: model_a
        dtype: float32
    """),
}

# (example, storage dtype of its models): the original's own storage first (Llama 2 13B and
# Mistral 7B are published in float16 and bfloat16), then others in rotation.
EXAMPLE_CASES = [
    ("linear.yml", "float16"), ("linear.yml", "bfloat16"),
    ("ties.yml", "float16"), ("ties.yml", "float32"),
    ("bio-merge.yml", "bfloat16"),
    ("gradient-slerp.yml", "float16"), ("gradient-slerp.yml", "float32"),
    ("orcamini-platy-44layer.yml", "float16"), ("orcamini-platy-44layer.yml", "bfloat16"),
    ("arcee_fusion.yml", "float32"),
]


def models_of(recipe) -> set:
    """The names of every model a recipe (or a part of one) reads."""
    if isinstance(recipe, list):
        return set().union(*map(models_of, recipe)) if recipe else set()
    if not isinstance(recipe, dict):
        return set()
    return {recipe[k] for k in ("model", "base_model") if k in recipe} | models_of(list(recipe.values()))


def assert_slerp_bits(ours: dict, theirs: dict, inputs: list) -> None:
    """SLERP: at most 1 ulp (its coefficients a, b differ from mergekit's in their last float32
    bit, see tests/test_merge_dtype_semantics.py); more only where a x + b y nearly cancels, and
    then by no more than the last bits of float32 terms of |x| + |y| (one bit of ~1e-3 terms is
    a few ulps of a 1e-8 result: a case seen, bf16 lm_head.weight, 4 ulps, ours the one nearer
    the exact result). Such entries are rare."""
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        far = ulps(ours[key], theirs[key]) > 1
        terms = sum(np.abs(x[key].astype(np.float64)) for x in inputs)
        gap = np.abs(ours[key].astype(np.float64) - theirs[key].astype(np.float64))
        assert far.sum() <= max(1, 1e-3 * far.size) and np.all(gap[far] <= 2.0**-22 * terms[far]), (
            f"{key}: {int(far.sum())} entries differ by more than 1 ulp, by up to {gap.max()}")


def check(method: str, ours: dict, theirs: dict, directory, names: dict, recipe: dict) -> None:
    """Bits, or the bound documented for the method (see the module's docstring)."""
    if method == "slerp":
        assert_slerp_bits(ours, theirs, [read(directory / names[m]) for m in models_of(recipe)])
    elif method == "arcee_fusion":
        base = read(directory / names[recipe["base_model"]])
        (source,) = (m["model"] for m in recipe["models"] if m["model"] != recipe["base_model"])
        compare(ours, theirs, "flips", base, read(directory / names[source]))
    elif method == "nearswap":
        compare(ours, theirs, "exact")
    elif method in ("nuslerp", "multislerp", "karcher", "sce"):
        compare(ours, theirs, ULPS)
    else:
        assert_bits(ours, theirs)


@pytest.mark.parametrize("name, storage", EXAMPLE_CASES, ids=[f"{n}-{s}" for n, s in EXAMPLE_CASES])
def test_mergekit_examples(families, tmp_path, name, storage):
    architecture, text = EXAMPLES[name]
    directory = families / architecture / storage
    recipe = yaml.safe_load(textwrap.dedent(text))
    ours, theirs = run_both(rewrite(text, EXAMPLE_NAMES, directory), tmp_path)
    check(recipe["merge_method"], ours, theirs, directory, EXAMPLE_NAMES, recipe)


# ----------------------------------------------------------------------------- test_basic_merges.py

# mergekit's three random picollamas: here two fine-tunes and their base (model_c is the base
# model of every configuration with a third model).
BASIC_NAMES = {"model_a": "ft0", "model_b": "ft2", "model_c": "base"}


def two_model_config(model_a, model_b, merge_method: str, base_model=None, params=None, dtype="bfloat16",
                     weights=(0.6, 0.4)) -> str:
    """test_basic_merges.py's `two_model_config` as YAML: weights 0.6 and 0.4, dtype bfloat16."""
    config = {"merge_method": merge_method, "base_model": base_model,
              "models": [{"model": model_a, "parameters": {"weight": weights[0]}},
                         {"model": model_b, "parameters": {"weight": weights[1]}}],
              "dtype": dtype, "parameters": params}
    return yaml.safe_dump({k: v for k, v in config.items() if v is not None}, sort_keys=False)


# test name in test_basic_merges.py (and a variant): its configuration. "float32": the newer
# methods' `dtype: bfloat16` rewritten (their half precision is test_merge_more_methods.py's).
BASIC = {
    "test_passthrough_scale": yaml.safe_dump({"merge_method": "passthrough", "models": [
        {"model": "model_a", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}),
    "test_linear_merge": two_model_config("model_a", "model_b", "linear"),
    "test_slerp_merge": two_model_config("model_a", "model_b", "slerp", base_model="model_a", params={"t": 0.35}),
    **{f"test_nuslerp_merges[base={base}, row_wise={row_wise}, flatten={flatten}]": two_model_config(
        "model_a", "model_b", "nuslerp", base_model=base, dtype="float32",
        params={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten})
       for base in (None, "model_c") for row_wise in (False, True) for flatten in (False, True)},
    "test_nuslerp_merges[weights that sum to zero]": two_model_config(
        "model_a", "model_b", "nuslerp", base_model="model_c", dtype="float32", weights=(-0.5, 0.5),
        params={"nuslerp_row_wise": False, "nuslerp_flatten": False}),
    "test_task_arithmetic_merge": two_model_config("model_a", "model_b", "task_arithmetic", base_model="model_c"),
    "test_breadcrumbs_merge": two_model_config("model_a", "model_b", "breadcrumbs", base_model="model_c"),
    "test_ties_merge": two_model_config("model_a", "model_b", "ties", base_model="model_c", params={"density": 0.3}),
    "test_sce_merge": two_model_config("model_a", "model_b", "sce", base_model="model_c", dtype="float32",
                                       params={"select_topk": 0.5}),
    "test_multislerp_merge": two_model_config("model_a", "model_b", "multislerp", base_model="model_c",
                                              dtype="float32"),
    "test_model_stock_merge": two_model_config("model_b", "model_c", "model_stock", base_model="model_a"),
    "test_model_stock_filterwise_merge": two_model_config("model_b", "model_c", "model_stock", base_model="model_a",
                                                          params={"filter_wise": True}),
    "test_arcee_fusion_merge": two_model_config("model_a", "model_b", "arcee_fusion", base_model="model_a",
                                                dtype="float32"),
    "test_nearswap_merge": two_model_config("model_a", "model_b", "nearswap", base_model="model_a", dtype="float32",
                                            params={"t": 0.0001}),
    "test_karcher_merge": two_model_config("model_a", "model_b", "karcher", base_model="model_c", dtype="float32",
                                           params={"max_iter": 5, "tol": 1e-5}),
}

# (configuration, storage): mergekit's picollamas are float32; the first set's methods rotate
# through the other two (with the examples above, each method meets each storage dtype).
BASIC_CASES = [
    ("test_passthrough_scale", "float32"), ("test_passthrough_scale", "float16"),
    ("test_linear_merge", "float32"),
    ("test_slerp_merge", "bfloat16"),
    *((name, "float32") for name in BASIC if name.startswith("test_nuslerp_merges")),
    ("test_task_arithmetic_merge", "float32"), ("test_task_arithmetic_merge", "bfloat16"),
    ("test_task_arithmetic_merge", "float16"),
    ("test_breadcrumbs_merge", "float32"), ("test_breadcrumbs_merge", "bfloat16"),
    ("test_breadcrumbs_merge", "float16"),
    ("test_ties_merge", "float32"), ("test_ties_merge", "bfloat16"),
    ("test_sce_merge", "float32"),
    ("test_multislerp_merge", "float32"),
    ("test_model_stock_merge", "float32"), ("test_model_stock_merge", "bfloat16"),
    ("test_model_stock_merge", "float16"),
    ("test_model_stock_filterwise_merge", "bfloat16"),
    ("test_arcee_fusion_merge", "float32"),
    ("test_nearswap_merge", "float32"),
    ("test_karcher_merge", "float32"),
]


@pytest.mark.parametrize("name, storage", BASIC_CASES, ids=[f"{n}-{s}" for n, s in BASIC_CASES])
def test_mergekit_basic_merges(families, tmp_path, name, storage):
    directory = families / "llama" / storage
    recipe = yaml.safe_load(BASIC[name])
    recipe.setdefault("dtype", storage)
    ours, theirs = run_both(rewrite(BASIC[name], BASIC_NAMES, directory), tmp_path)
    check(recipe["merge_method"], ours, theirs, directory, BASIC_NAMES, recipe)
    if name == "test_passthrough_scale":  # what mergekit's test checks: o_proj zeroed, the rest kept
        tuned = read(directory / "ft0")
        for key, value in ours.items():
            np.testing.assert_array_equal(value, np.zeros_like(value) if "o_proj" in key else tuned[key], err_msg=key)


# ----------------------------------------------------------------------------- random methods


def change_statistics(merged: dict, base: dict) -> tuple[float, float]:
    """Fraction of entries moved off the base, and their mean |change|."""
    moved, total, size = 0, 0.0, 0
    for key, value in base.items():
        delta = np.abs(merged[key].astype(np.float32) - value.astype(np.float32))
        moved += int((delta > 0).sum())
        total += float(delta.sum())
        size += delta.size
    return moved / size, total / moved


RANDOM_CASES = {
    "test_dare_ties_merge": ("bfloat16", two_model_config("model_a", "model_b", "dare_ties", base_model="model_c",
                                                          params={"density": 0.66})),
    "test_della_merge": ("float16", two_model_config("model_a", "model_b", "della", base_model="model_c",
                                                     params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5})),
}


@pytest.mark.parametrize("name", sorted(RANDOM_CASES))
def test_mergekit_basic_random_merges(families, tmp_path, name):
    """Other masks than mergekit's, of the same kept fraction and rescaling: the same share of
    entries moved off the base, by the same mean amount."""
    storage, text = RANDOM_CASES[name]
    directory = families / "llama" / storage
    ours, theirs = run_both(rewrite(text, BASIC_NAMES, directory), tmp_path)
    base = read(directory / "base")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype for k in ours)
    moved_ours, size_ours = change_statistics(ours, base)
    moved_theirs, size_theirs = change_statistics(theirs, base)
    assert moved_ours == pytest.approx(moved_theirs, abs=0.01)
    assert size_ours == pytest.approx(size_theirs, rel=0.03)
    assert moved_ours < 0.95  # entries were dropped
    assert any((ours[k] != theirs[k]).any() for k in ours)  # other masks


FIRST_SET = ("linear", "task_arithmetic", "ties", "breadcrumbs", "slerp", "model_stock", "passthrough")


def test_each_first_set_method_meets_each_storage_dtype():
    """The rotation above: no method of the first set left out of a storage dtype."""
    covered = {(yaml.safe_load(textwrap.dedent(EXAMPLES[name][1]))["merge_method"], storage)
               for name, storage in EXAMPLE_CASES}
    covered |= {(yaml.safe_load(BASIC[name])["merge_method"], storage) for name, storage in BASIC_CASES}
    assert {(method, storage) for method in FIRST_SET for storage in STORAGE} <= covered
