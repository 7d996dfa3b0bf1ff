"""The ja_math experiment end to end on the shipped toy world (a short search)."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jaxmerge
from jaxmerge.experiments import ja_math
from jaxmerge.pipeline.rundir import make_run_dir
from jaxmerge.testing import toy_world as tw


def test_shipped_toy_world_is_complete():
    world = tw.world_dir(0)
    assert world == tw.SHIPPED / "seed0"
    for name in ("base", "japanese", "math"):
        assert (world / name / "model.safetensors").exists() and (world / name / "tokenizer.json").exists()


def test_ja_math_toy_run(tmp_path):
    out = tmp_path / "run"
    args = ["--out", str(out), "--generations", "3", "--dfs-generations", "2", "--test-size", "8", "--population", "4",
            "--dfs-population", "4"]  # small: the assertions are on what the run writes, not on its scores
    results = ja_math.main(args)
    kinds = [row["kind"] for row in results["rows"]]
    assert kinds.count("source") == 2 and kinds.count("trivial") == 3 and kinds.count("merge") == 2
    assert kinds[-3:] == ["evolved"] * 3
    assert [r["model"] for r in results["rows"][-2:]] == ["evolved DFS merge (layer path)", "evolved PS+DFS merge"]
    assert set(results["rows"][-1]["scores"]) == {"ja_math", "ja_qa", "en_math"}
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    for name in ("results.md", "fitness.png", "genome.png", "recipe.yml", "search/generations.jsonl",
                 "merged/config.json", "merged/mergekit_config.yml"):
        assert (out / name).exists(), name
    assert len((out / "search/generations.jsonl").read_text().splitlines()) == 3
    assert len((out / "search_dfs/generations.jsonl").read_text().splitlines()) == 2
    for name in ("path_dfs.png", "path_ps_dfs.png", "merged_dfs/modeling_layer_path.py", "merged_ps_dfs/config.json"):
        assert (out / name).exists(), name
    # The DFS model on disk: transformers (remote code) gives the logits we give.
    dfs = AutoModelForCausalLM.from_pretrained(out / "merged_dfs", trust_remote_code=True, dtype=torch.float32)
    np.testing.assert_allclose(np.asarray(jaxmerge.load(out / "merged_dfs")(np.array([[1, 20, 21, 22]]))),
                               dfs(torch.tensor([[1, 20, 21, 22]])).logits.detach().numpy(), atol=1e-4)
    assert results["search_dfs"]["path_names"][0] == "A0"
    # The merged checkpoint is a real HF checkpoint: transformers gives the logits we give.
    ids = np.array([[1, 20, 21, 22, 23, 24]])
    theirs = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)(torch.tensor(ids)).logits
    ours = jaxmerge.load(out / "merged")(ids)
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), atol=1e-4)
    with pytest.raises(FileExistsError, match="finished run"):
        ja_math.main(args)


def test_run_dir_resumes_only_the_same_unfinished_run(tmp_path):
    out = tmp_path / "run"
    assert make_run_dir(str(out), "x", {"seed": 0}) == out
    (out / "search").mkdir()
    assert make_run_dir(str(out), "x", {"seed": 0}) == out  # resume
    with pytest.raises(FileExistsError, match="not an unfinished run"):
        make_run_dir(str(out), "x", {"seed": 1})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_run_dir(str(other), "x", {})


def test_ja_math_real_checkpoint_mode(tmp_path):
    """--models/--base/JSONL/template: the paper's setting, here on the toy checkpoints."""
    world = tw.world_dir(0)
    rng = np.random.default_rng(0)
    for name, count in (("fitness", 48), ("test", 24)):
        rows = [tw.japanese_math(rng) for _ in range(count)]
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": q, "answer": int(a.rstrip("こ"))}, ensure_ascii=False) + "\n" for q, a in rows))
    out = tmp_path / "run"
    results = ja_math.main(["--out", str(out), "--base", str(world / "base"), "--models", str(world / "japanese"),
                            str(world / "math"), "--fitness-set", str(tmp_path / "fitness.jsonl"),
                            "--test-set", str(tmp_path / "test.jsonl"), "--prompt-template", "{question}",
                            "--validation-size", "16", "--minibatch", "16", "--max-new-tokens", "4",
                            "--generations", "2", "--population", "4", "--dfs-generations", "1",
                            "--dfs-population", "4"])
    assert results["splits"] == {"ja_math": {"fitness": 32, "validation": 16, "test": 24}}
    assert results["search"]["layer_groups"] == 1 and len(results["search"]["genome"]["weight"][0]) == 1
    assert (out / "merged" / "config.json").exists()
    assert results["search_dfs"]["population"] == 4 and (out / "merged_ps_dfs" / "config.json").exists()
