"""The `jaxmerge` command line, run as a user would."""

import json
import subprocess
import sys

import numpy as np
import torch
from conftest import hf_logits, make_hf_model, random_ids
from test_checkpoint import add_tokenizer
from transformers import AutoModelForCausalLM

from jaxmerge.cli import main


def test_info_and_convert(hf_checkpoint, tmp_path, capsys):
    hf_model, directory = hf_checkpoint("mistral_sliding")
    assert main(["info", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "MistralForCausalLM" in out and "sliding window 4" in out
    assert main(["convert", str(directory), str(tmp_path / "bf16"), "--dtype", "bfloat16",
                 "--shard-size", "20KB"]) == 0
    reopened = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert reopened.dtype == torch.bfloat16
    ids = random_ids(1, 6)
    np.testing.assert_allclose(hf_logits(reopened, ids), hf_logits(hf_model, ids), atol=0.05)


def test_errors_name_the_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jaxmerge.cli", "info", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{tmp_path}/config.json: missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_decodes_with_the_model_tokenizer(hf_checkpoint, capsys):
    _, directory = hf_checkpoint("llama_tied_theta", vocab_size=23)
    add_tokenizer(directory)
    assert main(["generate", str(directory), "--prompt", "w1 w2 w3", "--prompt", "w4",
                 "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("'w1 w2 w3' -> ")


def test_generate_chat_applies_the_tokenizers_template(hf_checkpoint, capsys):
    _, directory = hf_checkpoint("llama_tied_theta", vocab_size=23)
    add_tokenizer(directory)
    assert main(["generate", str(directory), "--prompt", "w1 w2", "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    config = directory / "tokenizer_config.json"
    template = ("{% for m in messages %}w9 {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} w10"
                "{% endif %}")
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    assert main(["generate", str(directory), "--prompt", "w1 w2", "--chat", "--max-new-tokens", "4"]) == 0
    chat = capsys.readouterr().out.strip()
    assert main(["generate", str(directory), "--prompt", "w9 w1 w2 w10", "--max-new-tokens", "4"]) == 0
    plain = capsys.readouterr().out.strip()
    assert chat.startswith("'w1 w2' -> ") and chat.split(" -> ")[1] == plain.split(" -> ")[1]


def test_merge_command(hf_checkpoint, tmp_path, capsys):
    _, base = hf_checkpoint("llama_tied_theta")
    other = tmp_path / "other"
    make_hf_model("llama_tied_theta", seed=1).save_pretrained(other)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {other}\n"
                      f"parameters: {{t: 0.5}}\n")
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "mergekit_config.yml").is_file()
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2  # not empty now
    assert "not empty" in capsys.readouterr().err


def test_info_describes_a_vlm_and_a_layer_path(capsys):
    from jaxmerge.testing import toy_vlm_world as tv

    assert main(["info", str(tv.world_dir(0) / "vlm")]) == 0
    out = capsys.readouterr().out
    assert "LlavaForConditionalGeneration" in out and "layers 4, hidden 64" in out


def test_merge_refuses_non_finite_inputs_unless_allowed(hf_checkpoint, tmp_path, capsys):
    from test_input_validation import rewrite_tensors

    _, base = hf_checkpoint("mistral_gqa")
    source = tmp_path / "source"
    make_hf_model("mistral_gqa", seed=1).save_pretrained(source)
    key = "model.layers.0.mlp.up_proj.weight"
    rewrite_tensors(source / "model.safetensors", lambda t: t[key].__setitem__((0, 0), np.nan))
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                      f"  - model: {source}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    assert f"tensor {key} holds 1 NaN" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--allow-non-finite"]) == 0
