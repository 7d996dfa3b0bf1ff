"""jaxmerge as an lm-eval model, against lm-eval's own `hf` backend on the same checkpoints.

Offline custom tasks (task YAMLs over local JSONL, through `include_path`) of every output
type: multiple_choice and loglikelihood (loglikelihood requests), loglikelihood_rolling, and
generate_until (stop sequences, max_gen_toks). Two families: a random Llama checkpoint (a
tokenizer that adds BOS, a chat template), and the shipped toy world's trained math model
(Mistral; no BOS, no EOS in its config), whose greedy answers differ from item to item. A random
Qwen2 serves the command line.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys

import jax
import lm_eval
import numpy as np
import pytest
import yaml
from conftest import make_hf_model
from lm_eval.tasks import TaskManager
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import jaxmerge
from jaxmerge.cli import main
from jaxmerge.harness import JaxmergeLM
from jaxmerge.harness.programs import score_program
from jaxmerge.harness.tasks import LmEvalTask, prepare
from jaxmerge.pipeline import load_config
from jaxmerge.testing import toy_world

ATOL = 1e-4
TASKS = ["toy_mc", "toy_ll", "toy_gen", "toy_ppl"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def char_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """One token per character (ASCII letters, digits, punctuation), as many as the tiny models' vocabulary."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = list(string.ascii_lowercase + string.digits + " \n.,?:!'-+=" + string.ascii_uppercase)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_tasks(directory, seed: int = 0, rows: int = 6) -> None:
    """Task YAMLs over JSONL made from the toy world's templates (text every model here can read)."""
    rng = np.random.default_rng(seed)
    mc, ll, gen = [], [], []
    for _ in range(rows):
        prompt, answer = toy_world.arithmetic(rng)
        wrong = sorted({str(int(answer) + 1), str(int(answer) + 2)})
        choices = [answer, *wrong]
        order = rng.permutation(len(choices))
        mc.append({"question": prompt, "choices": [choices[i] for i in order], "label": int(np.argmax(order == 0))})
    for _ in range(5):
        prompt, answer = toy_world.english_qa(rng)
        ll.append({"question": prompt, "answer": answer})
    for _ in range(rows):
        prompt, answer = toy_world.english_math(rng)
        gen.append({"question": prompt, "answer": answer})
    texts = [{"text": toy_world.english_statement(rng)[1] + " " + toy_world.english_story(rng)[1]} for _ in range(4)]
    for name, rows in (("mc", mc), ("ll", ll), ("gen", gen), ("ppl", texts)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    def task(name: str, body: str) -> None:
        (directory / f"toy_{name}.yaml").write_text(
            f"task: toy_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {directory}/{name}.jsonl\ntest_split: test\nfewshot_split: test\n{body}")

    task("mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
         'doc_to_target: "{{label}}"\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    task("ll", 'output_type: loglikelihood\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
         'target_delimiter: ""\nmetric_list:\n  - metric: perplexity\n  - metric: acc\n')
    task("gen", 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
         'target_delimiter: ""\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 6\n  do_sample: false\n'
         'metric_list:\n  - metric: exact_match\n')
    task("ppl", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{model name: checkpoint directory}, and the task directory."""
    root = tmp_path_factory.mktemp("harness")
    directories = {}
    for name, adds_bos in (("llama_tied_theta", True), ("qwen2_bias_tied", False)):
        make_hf_model(name).save_pretrained(root / name)
        char_tokenizer(adds_bos).save_pretrained(root / name)
        directories[name] = root / name
    directories["toy_math"] = toy_world.world_dir(0) / "math"
    tasks = root / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    return directories, tasks


def evaluate(backend: str, directory, tasks, **options) -> dict:
    jax.config.update("jax_default_matmul_precision", "highest")
    return lm_eval.simple_evaluate(model=backend, model_args=f"pretrained={directory},dtype=float32", tasks=TASKS,
                                   task_manager=TaskManager(include_path=str(tasks)), log_samples=True, batch_size=4,
                                   bootstrap_iters=0, device="cpu", **options)


def assert_same_answers(hf: dict, ours: dict) -> None:
    for task in TASKS:
        for theirs, mine in zip(hf["samples"][task], ours["samples"][task], strict=True):
            assert theirs["doc_id"] == mine["doc_id"]
            for a, b in zip(theirs["resps"], mine["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(a, str):  # a generation: the same text
                    assert a == b, (task, theirs["doc_id"])
                elif isinstance(a, tuple):  # (log-likelihood, greedy)
                    assert b[0] == pytest.approx(a[0], abs=ATOL) and b[1] == a[1], (task, a, b)
                else:  # a rolling log-likelihood
                    assert b == pytest.approx(a, abs=ATOL), (task, a, b)
        for metric, value in hf["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)


@pytest.mark.parametrize("name, options", [
    ("llama_tied_theta", dict(apply_chat_template=True, num_fewshot=1, fewshot_as_multiturn=True)),
    ("toy_math", dict(num_fewshot=1)),
], ids=["llama_chat_fewshot", "toy_math_fewshot"])
def test_answers_equal_the_hf_backend(world, name, options):
    directories, tasks = world
    hf = evaluate("hf", directories[name], tasks, **options)
    ours = evaluate("jaxmerge", directories[name], tasks, **options)
    assert_same_answers(hf, ours)
    if name == "toy_math":  # a trained model: answers that vary and end (EOS or the stop sequence) early
        answers = [s["resps"][0][0] for s in ours["samples"]["toy_gen"]]
        assert len(set(answers)) > 1 and max(map(len, answers)) < 6, answers


def test_command_line_writes_lm_eval_results(world, tmp_path):
    directories, tasks = world
    code = main(["lm-eval", "--model", "jaxmerge", "--model_args", f"pretrained={directories['qwen2_bias_tied']}",
                 "--tasks", "toy_mc", "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu",
                 "--output_path", str(tmp_path / "out")])
    assert code == 0
    [results] = list((tmp_path / "out").rglob("results_*.json"))
    assert "acc,none" in json.loads(results.read_text())["results"]["toy_mc"]


def test_requests_share_a_few_compiled_shapes(world):
    directory = world[0]["qwen2_bias_tied"]
    lm = JaxmergeLM(model=jaxmerge.load(directory), tokenizer=char_tokenizer(False), batch_size=2)
    before = score_program._cache_size()
    rows = [lm.token_request([1] + list(range(4, 4 + n)), [5, 6]) for n in range(1, 40, 3)]  # 14 lengths
    results = lm.score(rows)
    assert len(results) == len(rows) and all(np.isfinite(logprob) for logprob, _ in results)
    assert score_program._cache_size() - before <= 3  # buckets 16, 32, 64


def test_sampling_requests_are_refused(world):
    from lm_eval.api.instance import Instance

    directory = world[0]["qwen2_bias_tied"]
    lm = JaxmergeLM(pretrained=str(directory))
    request = Instance("generate_until", {}, ("Q:", {"until": ["."], "do_sample": True, "temperature": 0.7}), 0)
    with pytest.raises(ValueError, match="decodes greedily"):
        lm.generate_until([request])


def test_evolve_on_lm_eval_tasks_of_a_mergekit_evolve_config(tmp_path):
    """mergekit-evolve's config shape (genome, tasks by lm-eval name with weight and metric, its
    top-level limit / num_fewshot), local paths: the search runs on lm-eval's rendered fitness
    documents, and results.json's test scores are lm-eval's own through the jaxmerge backend on
    the saved merge."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks, seed=1, rows=12)
    world = toy_world.world_dir(0)
    config = {
        "genome": {"models": [str(world / "japanese"), str(world / "math")], "merge_method": "dare_ties",
                   "base_model": str(world / "base"), "tokenizer_source": None, "layer_granularity": 3,
                   "normalize": False, "allow_negative_weights": False},
        "tasks": [{"name": "toy_gen", "weight": 1.0, "metric": "exact_match,none"},
                  {"name": "toy_mc", "weight": 0.5, "metric": "acc,none"}],
        "limit": 8, "num_fewshot": 1, "task_search_path": "tasks",
        "search": {"generations": 2, "minibatch": 4, "validation_size": 2},
        "dfs": {"mode": "off"}, "baselines": False,
    }
    path = tmp_path / "evolve.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = jaxmerge.evolve(load_config(path, [f"out={tmp_path / 'run'}"]))
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["lm_eval"]["toy_gen"]["fitness_documents"] == 8
    assert results["lm_eval"]["toy_gen"]["test_documents"] == 4
    [row] = [r for r in results["rows"] if r["kind"] == "evolved"]
    published = lm_eval.simple_evaluate(
        model="jaxmerge", model_args=f"pretrained={result.checkpoint('ps')}", tasks=["toy_gen", "toy_mc"],
        task_manager=TaskManager(include_path=str(tasks)), num_fewshot=1, bootstrap_iters=0,
        samples={name: results["lm_eval"][name]["test_ids"] for name in ("toy_gen", "toy_mc")})
    assert row["scores"]["toy_gen"] == pytest.approx(100 * published["results"]["toy_gen"]["exact_match,none"])
    assert row["scores"]["toy_mc"] == pytest.approx(100 * published["results"]["toy_mc"]["acc,none"])


def test_generation_fitness_is_the_tasks_own_filtered_metric(world):
    """A generate_until task's fitness: the response cut at the task's stop sequence, through the
    filter its metric key names, scored by the task's process_results."""
    _, tasks = world
    (tasks / "toy_gen_regex.yaml").write_text(
        (tasks / "toy_gen.yaml").read_text().replace("task: toy_gen", "task: toy_gen_regex")
        + 'filter_list:\n  - name: digits\n    filter:\n      - function: regex\n        regex_pattern: "(\\\\d+)"\n'
        "      - function: take_first\n")
    prepared = prepare(LmEvalTask("toy_gen_regex", metric="exact_match,digits", include_path=str(tasks),
                                  fitness_size=3), char_tokenizer(False))
    assert prepared.jaxmerge_metric == "host"
    prompt, answer = prepared.fitness.prompts[0], prepared.fitness.answers[0]
    score = prepared.host_metric
    assert score(prompt, f"it is {answer} now", answer) == 1.0  # the regex finds the number
    assert score(prompt, f"maybe. {answer}", answer) == 0.0  # cut at the stop sequence "."
    assert score(prompt, "none", answer) == 0.0
    with pytest.raises(ValueError, match="has no filter 'loose'"):
        prepare(LmEvalTask("toy_gen_regex", metric="exact_match,loose", include_path=str(tasks), fitness_size=3),
                char_tokenizer(False))


LAYOUT_JOB = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from jaxmerge.harness import JaxmergeLM
out = {}
for layout in (None, "2x1", "1x2", "2x2"):
    lm = JaxmergeLM(pretrained=sys.argv[1], layout=layout, batch_size=4)
    rows = [lm.token_request([1] + list(range(4, 4 + n)), [5, 6, 7]) for n in range(1, 30, 4)]
    prompts = [lm.tok_encode(p) for p in ("Q:tom has 4 apples. gets 3 more. how many? A:", "Q:eva has 1 cups. A:")]
    sharding = str(jax.tree.leaves(lm._state)[0].sharding)
    out[str(layout)] = {"scores": lm.score(rows), "texts": lm.generate(prompts, 6, ["."]), "sharding": sharding}
print(json.dumps(out))
"""


def test_device_layouts_give_the_same_answers(world):
    """On 4 host devices: each batch split over the population axis, the weights sharded over
    the model axis; the same log-likelihoods and generations as on one device."""
    directory = world[0]["toy_math"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", LAYOUT_JOB, str(directory)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    single = out["None"]
    for layout in ("2x1", "1x2", "2x2"):
        assert out[layout]["texts"] == single["texts"]
        for (a, greedy_a), (b, greedy_b) in zip(single["scores"], out[layout]["scores"], strict=True):
            assert b == pytest.approx(a, abs=1e-5) and greedy_a == greedy_b
    assert "model" in out["1x2"]["sharding"] and "model" in out["2x2"]["sharding"]
