"""The README's and the guide's examples run as written (on tiny models standing in for 7B
ones), and their configs load."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model, random_ids

import jaxmerge

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
GUIDE = ROOT / "experiments" / "guide.md"


@pytest.mark.parametrize("page", [README, GUIDE], ids=["readme", "guide"])
def test_library_example(page, tmp_path, monkeypatch):
    code = re.search(r"<!-- library-example -->\n```python\n(.*?)```", page.read_text(), re.S).group(1)
    paths = []
    for i in range(3):
        model = make_hf_model("mistral_gqa", seed=0 if i == 0 else i)
        model.save_pretrained(tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    code = re.sub(r"paths = \[.*?\]", f"paths = {paths!r}", code)
    monkeypatch.chdir(tmp_path)
    namespace = {"input_ids": jnp.asarray(random_ids(2, 6))}
    exec(compile(code, str(page), "exec"), namespace)
    assert namespace["logits"].shape == (2, 6, 96)
    saved = jaxmerge.load(tmp_path / "out" / "merged")
    np.testing.assert_allclose(np.asarray(saved(namespace["input_ids"])), np.asarray(namespace["logits"]), atol=1e-4)


def test_readme_config_example_loads(tmp_path):
    """The README's config, saved in the repository root as it says, loads as written: its
    toy checkpoints and data exist and every key is valid."""
    from jaxmerge.pipeline import load_config

    text = re.search(r"```yaml\n(# my_merge\.yml, in the repository root.*?)```", README.read_text(), re.S).group(1)
    for name in ("jaxmerge", "experiments"):  # the repository root, seen from tmp_path
        (tmp_path / name).symlink_to(ROOT / name)
    path = tmp_path / "my_merge.yml"
    path.write_text(text, encoding="utf-8")
    loaded = load_config(path)
    assert [t.name for t in loaded.tasks] == ["ja_math"] and loaded.genome.merge_method == "task_arithmetic"
    assert all(Path(m).is_dir() for m in (*loaded.genome.models, loaded.genome.base_model))


def test_evolve_config_example_reads(tmp_path):
    """The guide's complete config example is valid (the toy's checkpoints standing in for
    the 7B ones, small data files for its data)."""
    import json

    import pandas as pd
    import yaml

    from jaxmerge.pipeline import load_config
    from jaxmerge.testing import toy_world as tw

    text = re.search(r"```yaml\n(# my_merge\.yml \(.*?)```", GUIDE.read_text(), re.S).group(1)
    world = tw.world_dir(0)
    config = yaml.safe_load(text)
    config["genome"]["models"] = [str(world / "japanese"), str(world / "math")]
    config["genome"]["base_model"] = str(world / "base")
    config["genome"]["layer_granularity"] = 3
    for task in config["tasks"]:  # within the toy's context of 128 tokens (a 7B model's is 32k)
        if task.get("max_new_tokens", 0) > 64:
            task["max_new_tokens"] = 64
    (tmp_path / "data").mkdir()
    rows = [{"problem": f"{i}+1", "solution_number": i + 1} for i in range(8)]
    for name in ("gsm8k_ko", "mgsm_ko"):
        (tmp_path / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    choices = pd.DataFrame({"question": ["q"] * 4, "choices": [["a", "b"]] * 4, "answer": [0, 1, 0, 1]})
    for name in ("kobest_train", "kobest_test"):
        choices.to_parquet(tmp_path / "data" / f"{name}.parquet")
    (tmp_path / "data" / "code_test.jsonl").write_text('{"question": "def f():", "answer": "pass"}\n')
    arc = {"question": "q", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"}
    (tmp_path / "data" / "arc_easy_test.jsonl").write_text(json.dumps(arc) + "\n")
    (tmp_path / "my_metrics.py").write_text("def passes_tests(prompt, response, reference):\n    return 1.0\n")
    path = tmp_path / "my_merge.yml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    loaded = load_config(path)
    assert [t.name for t in loaded.tasks] == ["ko_math", "ko_chat_skill", "arc", "code"]
    assert loaded.tasks[2].metric == "multiple_choice_norm"  # lm-eval's acc_norm
    assert loaded.genome.filters == ("self_attn", "mlp") and loaded.tasks[0].language == "korean"
