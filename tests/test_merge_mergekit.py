"""`jaxmerge merge` against mergekit's own outputs on tiny random models.

Deterministic methods must give the same tensors within 1e-5 (fp32); DARE and DELLA draw
different random masks, so their kept fraction and rescaling are compared instead.
"""

import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from conftest import hf_logits, make_hf_model, random_ids, write_fine_tuned_family
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

import jaxmerge
from jaxmerge.merge.plan import RecipeError
from jaxmerge.merge.recipe import merge_from_yaml

pytestmark = pytest.mark.skipif(shutil.which("mergekit-yaml") is None, reason="mergekit not installed")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three fine-tunes of it (base + noise), as mergekit's users have them."""
    root = tmp_path_factory.mktemp("family")
    write_fine_tuned_family(root, num_hidden_layers=4)
    return root


def run_both(family, tmp_path, recipe: str, seed: int = 0):
    recipe = textwrap.dedent(recipe).replace("ROOT", str(family))
    (tmp_path / "recipe.yml").write_text(recipe)
    ours = merge_from_yaml(tmp_path / "recipe.yml", tmp_path / "ours", seed=seed, progress=False)
    result = subprocess.run(["mergekit-yaml", str(tmp_path / "recipe.yml"), str(tmp_path / "theirs"),
                             "--random-seed", str(seed), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return read(ours), read(tmp_path / "theirs")


def read(directory):
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_same(ours, theirs, atol=1e-5):
    assert ours.keys() == theirs.keys()
    worst = max(float(np.abs(ours[k].astype(np.float32) - theirs[k].astype(np.float32)).max()) for k in ours)
    assert worst <= atol, f"largest difference {worst}"


DETERMINISTIC = {
    "linear": """
        merge_method: linear
        models:
          - model: ROOT/ft0
            parameters: {weight: 0.6}
          - model: ROOT/ft1
            parameters: {weight: [0.2, 0.9]}
          - model: ROOT/ft2
            parameters: {weight: 0.3}
        dtype: float32
    """,
    "task_arithmetic_filters": """
        merge_method: task_arithmetic
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters:
              weight: [{filter: self_attn, value: 0.8}, {filter: mlp, value: [0.1, 0.5, 1.0]}, {value: 0.4}]
          - model: ROOT/ft1
            parameters: {weight: 0.5}
        parameters: {lambda: 1.3}
        dtype: float32
    """,
    "ties_gradients": """
        merge_method: ties
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters: {density: [0.2, 0.8], weight: 0.7}
          - model: ROOT/ft1
            parameters: {density: 0.5, weight: [1.0, 0.3]}
          - model: ROOT/ft2
            parameters: {density: 0.4, weight: 0.5}
        parameters: {normalize: true}
        dtype: float32
    """,
    "ties_unnormalized_int8": """
        merge_method: ties
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
          - model: ROOT/ft1
        parameters: {density: 0.3, weight: 0.9, normalize: false, int8_mask: true}
        dtype: float32
    """,
    "breadcrumbs_ties": """
        merge_method: breadcrumbs_ties
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters: {density: 0.6, gamma: 0.05, weight: 0.6}
          - model: ROOT/ft1
            parameters: {density: 0.7, gamma: 0.02, weight: 0.6}
        dtype: float32
    """,
    "slerp_slices": """
        merge_method: slerp
        base_model: ROOT/base
        slices:
          - sources:
              - model: ROOT/base
                layer_range: [0, 4]
              - model: ROOT/ft2
                layer_range: [0, 4]
        parameters:
          t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0]}, {value: 0.5}]
        dtype: float32
    """,
    "model_stock": """
        merge_method: model_stock
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
          - model: ROOT/ft1
          - model: ROOT/ft2
        dtype: float32
    """,
    "passthrough_frankenmerge": """
        merge_method: passthrough
        slices:
          - sources:
              - model: ROOT/ft0
                layer_range: [0, 3]
          - sources:
              - model: ROOT/ft1
                layer_range: [1, 4]
                parameters:
                  scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: 0.5}, {value: 1.0}]
        dtype: float32
    """,
    "task_arithmetic_slices_precedence": """
        merge_method: task_arithmetic
        base_model: ROOT/base
        slices:
          - sources:
              - model: ROOT/base
                layer_range: [0, 2]
              - model: ROOT/ft0
                layer_range: [0, 2]
                parameters: {weight: 0.9}
              - model: ROOT/ft1
                layer_range: [0, 2]
            parameters: {weight: 0.2}
          - sources:
              - model: ROOT/base
                layer_range: [2, 4]
              - model: ROOT/ft0
                layer_range: [2, 4]
              - model: ROOT/ft1
                layer_range: [2, 4]
        parameters: {weight: [0.4, 0.6]}
        dtype: float32
    """,
}


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_methods_match_mergekit(family, tmp_path, name):
    ours, theirs = run_both(family, tmp_path, DETERMINISTIC[name])
    assert_same(ours, theirs)


def sparsity_stats(merged, base, tuned):
    """Fraction of entries that moved off the base, and mean |change| where they did."""
    moved, total, size = 0, 0.0, 0
    for k in base:
        delta = merged[k] - base[k]
        nonzero = np.abs(delta) > 1e-9
        moved += int(nonzero.sum())
        total += float(np.abs(delta[nonzero]).sum())
        size += delta.size
    return moved / size, total / max(moved, 1)


@pytest.mark.parametrize("method,extra", [("dare_linear", ""), ("dare_ties", ""),
                                          ("della_linear", "epsilon: 0.1,")])
def test_random_methods_match_mergekit_statistics(family, tmp_path, method, extra):
    recipe = f"""
        merge_method: {method}
        base_model: ROOT/base
        models:
          - model: ROOT/ft2
            parameters: {{density: 0.3, {extra} weight: 1.0}}
        dtype: float32
    """
    ours, theirs = run_both(family, tmp_path, recipe)
    base = read(family / "base")
    kept_ours, size_ours = sparsity_stats(ours, base, None)
    kept_theirs, size_theirs = sparsity_stats(theirs, base, None)
    assert kept_ours == pytest.approx(0.3, abs=0.01) and kept_theirs == pytest.approx(0.3, abs=0.01)
    # L1 rescaling: the kept entries carry the whole task vector's mass (~1/density each).
    assert size_ours == pytest.approx(size_theirs, rel=0.03)
    # Different masks, so not equal; but both are base + rescaled kept task-vector entries.
    tuned = read(family / "ft2")
    for k in ("model.layers.1.mlp.up_proj.weight",):
        d = tuned[k] - base[k]
        kept = np.abs(ours[k] - base[k]) > 1e-9
        ratio = (ours[k] - base[k])[kept] / d[kept]
        assert np.allclose(ratio, ratio[0], rtol=1e-4) and 2.5 < ratio[0] < 4.5


def test_merged_model_runs_and_reopens(family, tmp_path):
    ours, _ = run_both(family, tmp_path, DETERMINISTIC["ties_gradients"])
    reopened = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    ids = random_ids(1, 8)
    np.testing.assert_allclose(np.asarray(jaxmerge.load(tmp_path / "ours")(ids)), hf_logits(reopened, ids),
                               atol=1e-4)
    assert (tmp_path / "ours" / "mergekit_config.yml").read_text().startswith("\nmerge_method: ties")


def test_frankenmerge_layer_count(family, tmp_path):
    ours, _ = run_both(family, tmp_path, DETERMINISTIC["passthrough_frankenmerge"])
    assert jaxmerge.load(tmp_path / "ours").config.num_layers == 6
    tuned1 = read(family / "ft1")
    np.testing.assert_array_equal(ours["model.layers.3.mlp.up_proj.weight"],
                                  tuned1["model.layers.1.mlp.up_proj.weight"])
    np.testing.assert_allclose(ours["model.layers.3.mlp.down_proj.weight"],
                               0.5 * tuned1["model.layers.1.mlp.down_proj.weight"], rtol=1e-6)


@pytest.mark.parametrize("recipe,message", [
    ("merge_method: nope\nmodels: [{model: B}]\n", "merge_method.*unknown merge method 'nope'"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: B}]\nmodules: {}\n", "unsupported key.*'modules'"),
])
def test_bad_recipes_name_the_key(tmp_path, recipe, message):
    (tmp_path / "r.yml").write_text(recipe)
    with pytest.raises(RecipeError, match=message):
        merge_from_yaml(tmp_path / "r.yml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_weight_names_model_and_tensor(family, tmp_path):
    (tmp_path / "r.yml").write_text(f"merge_method: ties\nbase_model: {family}/base\nmodels:\n"
                                    f"  - model: {family}/ft0\n    parameters: {{density: 0.5}}\n")
    with pytest.raises(RecipeError, match=r"missing parameter 'weight' for .*ft0 \(tensor model\.embed_tokens"):
        merge_from_yaml(tmp_path / "r.yml", tmp_path / "out", progress=False)


# ------------------------------------------------------------------ vocabulary mismatch


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """A base with 23 tokens; two fine-tunes that each added one word of their own."""
    root = tmp_path_factory.mktemp("vocab")
    words = [f"w{i}" for i in range(20)]
    base = make_hf_model("mistral_gqa", seed=0, vocab_size=23, num_hidden_layers=2)
    base.save_pretrained(root / "base")
    word_tokenizer(words).save_pretrained(root / "base")
    for i, extra in enumerate(["xa", "xb"]):
        tuned = make_hf_model("mistral_gqa", seed=0, vocab_size=23, num_hidden_layers=2)
        tuned.resize_token_embeddings(24)
        torch.manual_seed(200 + i)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn_like(p) * 0.03)
        tuned.save_pretrained(root / f"ft{i}")
        word_tokenizer(words + [extra]).save_pretrained(root / f"ft{i}")
    return root


def rows_by_token(directory, tensors, key="model.embed_tokens.weight"):
    from transformers import AutoTokenizer
    vocab = AutoTokenizer.from_pretrained(directory).get_vocab()
    return {token: tensors[key][index] for token, index in vocab.items()}


@pytest.mark.parametrize("source", ["union", "base"])
def test_tokenizer_source_matches_mergekit(vocab_family, tmp_path, source):
    recipe = f"""
        merge_method: task_arithmetic
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters: {{weight: 0.7}}
          - model: ROOT/ft1
            parameters: {{weight: 0.5}}
        tokenizer_source: {source}
        dtype: float32
    """
    ours, theirs = run_both(vocab_family, tmp_path, recipe)
    expected_vocab = 25 if source == "union" else 23
    assert ours["model.embed_tokens.weight"].shape[0] == expected_vocab
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        our_rows = rows_by_token(tmp_path / "ours", ours, key)
        their_rows = rows_by_token(tmp_path / "theirs", theirs, key)
        assert our_rows.keys() == their_rows.keys()
        for token in our_rows:  # the same row for every token, wherever each tool put it
            np.testing.assert_allclose(our_rows[token], their_rows[token], atol=1e-5, err_msg=f"{key} {token}")
    rest = [k for k in ours if "embed" not in k and "lm_head" not in k]
    assert_same({k: ours[k] for k in rest}, {k: theirs[k] for k in rest})
    assert jaxmerge.load(tmp_path / "ours").config.vocab_size == expected_vocab


def test_default_merges_common_rows(vocab_family, tmp_path):
    """Without tokenizer_source, embeddings merge on the base's rows (mergekit 0.1.5 refuses
    such a merge unless told --unsafe-truncate-embeddings, which does the same)."""
    recipe = textwrap.dedent("""
        merge_method: task_arithmetic
        base_model: ROOT/base
        models:
          - model: ROOT/ft0
            parameters: {weight: 1.0}
        dtype: float32
    """).replace("ROOT", str(vocab_family))
    (tmp_path / "r.yml").write_text(recipe)
    merged = read(merge_from_yaml(tmp_path / "r.yml", tmp_path / "ours", progress=False))
    tuned = read(vocab_family / "ft0")
    np.testing.assert_allclose(merged["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"][:23], atol=1e-6)


def test_mismatched_models_and_ranges_are_named(family, tmp_path):
    other = make_hf_model("mistral_gqa", seed=0, num_hidden_layers=4, intermediate_size=64)
    other.save_pretrained(tmp_path / "wide")
    (tmp_path / "r.yml").write_text(f"merge_method: task_arithmetic\nbase_model: {family}/base\nmodels:\n"
                                    f"  - model: {tmp_path}/wide\n    parameters: {{weight: 1.0}}\n")
    with pytest.raises(RecipeError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: .*wide has shape"):
        merge_from_yaml(tmp_path / "r.yml", tmp_path / "out", progress=False)
    (tmp_path / "s.yml").write_text(f"merge_method: passthrough\nslices:\n  - sources:\n"
                                    f"      - model: {family}/ft0\n        layer_range: [2, 9]\n")
    with pytest.raises(RecipeError, match=r"slices\[0\]\.sources\[0\]\.layer_range: \[2, 9\] past the 4 layers"):
        merge_from_yaml(tmp_path / "s.yml", tmp_path / "out", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(jaxmerge.CheckpointError, match="not empty"):
        merge_from_yaml(tmp_path / "s.yml", tmp_path / "busy", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layer_groups, gated", [(1, False), (2, False), (2, True)])
def test_exported_search_recipe_reproduces_in_mergekit(family, tmp_path, layer_groups, gated):
    """A genome saved as checkpoint + mergekit YAML: mergekit-yaml on the YAML gives the
    checkpoint's tensors. Gated: the second source's gate is shut, our merge gives it weight
    0 and the recipe leaves it out: the same tensors."""
    import jax

    from jaxmerge.search import GenomeSpace
    from jaxmerge.search.export import genome_recipe, save_merged

    space = GenomeSpace("ties", num_sources=2, num_layers=4, layer_groups=layer_groups, gates=gated)
    genome = np.asarray(space.initial()) + 0.2 * np.asarray(jax.random.normal(jax.random.key(5), (space.num_dims,)))
    if gated:
        genome[-2:] = [0.7, 0.3]  # gates: the first source in, the second out
        assert "ft1" not in genome_recipe(space, genome, "base", ["ft0", "ft1"], ["layers.mlp.up_proj.kernel"])
    paths = [str(family / "base"), str(family / "ft0"), str(family / "ft1")]
    models = [jaxmerge.load(p) for p in paths]
    ours = save_merged(space, genome, models[0], models[1:], tmp_path / "ours", base_path=paths[0],
                       source_paths=paths[1:])
    result = subprocess.run(["mergekit-yaml", str(ours / "mergekit_config.yml"), str(tmp_path / "theirs"), "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(read(ours), read(tmp_path / "theirs"))
