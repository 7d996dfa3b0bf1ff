"""The search on a device mesh (8 host CPU devices) and across processes (jax.distributed
on localhost): the same result as on one device, arrays sharded as planned."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmerge.parallel import Layout, model_spec

JOB = Path(__file__).parent / "parallel_job.py"


def json_lines(stdout: str) -> list[dict]:
    """A job's results: its lines of JSON (gloo may print after them, at shutdown)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def last_json(stdout: str) -> dict:
    return json_lines(stdout)[-1]


def run_job(out_dir, layouts: str, generations: int, devices: int = 8, processes: int = 1) -> list[dict]:
    """The job's JSON results (searches in out_dir/<layout>), per process, then per layout:
    several layouts (space-separated) run one after another in one process per process."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(Path(__file__).parent)}
    if processes > 1:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes))
    jobs = [subprocess.Popen([sys.executable, str(JOB), str(out_dir), str(generations), *layouts.split()],
                             env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(processes)]
    results = []
    for job in jobs:
        out, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-3000:]
        results.extend(json_lines(out))
    return results


def assert_same_history(a: list[dict], b: list[dict], label: str) -> None:
    """Equal, up to the last bits of a float sum (a device evaluates its slice of the
    population as a smaller batch, so reductions may round differently)."""
    import numpy as np

    assert len(a) == len(b), label
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys(), label
        for key in x:
            values = [np.asarray(v["weight"] if isinstance(v, dict) else v, float) for v in (x[key], y[key])]
            np.testing.assert_allclose(*values, rtol=1e-6,
                                       err_msg=f"{label}: generation {x['generation']} {key}")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, dict]:
    """The search of 8 generations on each layout of 8 devices, one after another in one process."""
    names = ("1x1", "8x1", "1x8", "4x2")
    return dict(zip(names, run_job(tmp_path_factory.mktemp("layouts"), " ".join(names), 8), strict=True))


def test_same_search_on_one_and_eight_devices(layouts):
    single = layouts["1x1"]
    for layout in ("8x1", "1x8", "4x2"):
        result = layouts[layout]
        assert result["devices"] == 8
        assert result["best_genome"] == single["best_genome"], layout
        assert_same_history(result["history"], single["history"], layout)
        assert result["compiled"] == 2, layout  # population and validation programs, whatever the layout
        model = Layout.parse(layout).model
        # Parameters sharded as planned: over the model axis on the largest even dimension.
        expected = {"['base']['embed_tokens.weight']": "P('model',)" if model > 1 else "P()",
                    "['sources']['layers.mlp.up_proj.kernel']": "P(None, None, None, 'model')" if model > 1
                    else "P()"}
        assert {k: result["specs"][k] for k in expected} == expected, layout


def test_two_processes_search_and_resume_like_one(tmp_path, layouts):
    single = layouts["1x1"]  # on one device
    first = run_job(tmp_path / "multi", "4x2", 4, devices=4, processes=2)  # stopped after 4 generations ...
    assert [r["processes"] for r in first] == [2, 2] and first[0]["devices"] == 8
    results = run_job(tmp_path / "multi", "4x2", 8, devices=4, processes=2)  # ... and resumed by both hosts
    for result in results:
        assert result["best_genome"] == single["best_genome"]
        assert_same_history(result["history"][4:], single["history"][4:], "two processes")
    log = (tmp_path / "multi" / "4x2" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["generation"] for line in log] == list(range(8))  # written once


def test_model_spec_and_layout_devices():
    from jax.sharding import PartitionSpec as P

    assert model_spec((32, 4096, 14336), 8) == P(None, None, "model")
    assert model_spec((32000, 4096), 8) == P("model")
    assert model_spec((4096,), 1) == P()
    assert model_spec((7,), 8) == P()
    with pytest.raises(ValueError, match="needs 16 devices"):
        Layout(8, 2).mesh()


def test_plan_command_reports_layouts_without_weights(tmp_path):
    """`jaxmerge plan` on a config.json alone: per-device memory for every layout of 4
    devices, compiled on 4 host CPU devices it sets up itself."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(dict(
        architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)))
    out = subprocess.run([sys.executable, "-m", "jaxmerge.cli", "plan", str(tmp_path / "model"), "--devices", "4",
                          "--device", "v5e", "--sources", "2", "--seq-len", "32", "--new-tokens", "8",
                          "--json", str(tmp_path / "plan.json")],
                         capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [r["layout"] for r in plan["layouts"]] == ["4x1", "2x2", "1x4"]
    assert plan["chosen"] == "4x1" and "chosen layout: 4x1" in out.stdout
    rows = {r["layout"]: r for r in plan["layouts"]}
    # Sharding the model axis 4 ways divides the resident models by 4.
    assert abs(rows["1x4"]["data_gib"] * 4 - rows["4x1"]["data_gib"]) < 1e-9
    assert rows["4x1"]["compiled_f32"]["eval"]["outputs"] > 0


def test_plan_of_a_pool_in_host_memory(tmp_path):
    """`on_device` (a pool kept in host memory): the device holds that many sources instead
    of the pool, which the plan counts in host memory."""
    from jaxmerge.plan import PlanRequest, plan

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(dict(
        architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=512, hidden_size=64,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)))
    request = PlanRequest(str(tmp_path / "model"), sources=6, method="ties", devices=1, seq_len=16, new_tokens=4)
    whole, pooled = plan(request), plan(dataclasses.replace(request, on_device=2))
    source_gib = (whole["layouts"][0]["data_gib"] - pooled["layouts"][0]["data_gib"]) / 4  # 6 less 2 sources
    assert source_gib > 0 and pooled["host_pool_gib"] == pytest.approx(6 * source_gib)
    assert whole["host_pool_gib"] == 0 and pooled["on_device"] == 2
    with pytest.raises(ValueError, match=r"on_device must be in \[1, 6\]"):
        plan(dataclasses.replace(request, on_device=7))


def test_sharded_load_reads_each_devices_slices(hf_checkpoint):
    """jaxmerge.load(sharding=mesh): the parameters as a plain load gives them, each array
    sharded over the model axis as the search shards it (kernels read transposed, layer
    by layer, as slices)."""
    _, directory = hf_checkpoint("mistral_gqa")
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "sharded_load_job.py"), str(directory)],
                         capture_output=True, text=True,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = last_json(out.stdout)
    assert result["equal"]
    assert "'model'" in result["specs"]["['layers']['mlp']['up_proj']['kernel'].value"]
    assert result["logits_difference"] < 1e-4


def test_save_from_two_processes_writes_one_whole_checkpoint(hf_checkpoint, tmp_path):
    """A model sharded across two processes (no process holds whole arrays) saves as one
    checkpoint, written by process 0 with the arrays gathered from both, equal to its source."""
    import numpy as np
    from safetensors.numpy import load_file

    _, directory = hf_checkpoint("mistral_gqa")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
    out = tmp_path / "outputs" / "saved"
    jobs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "multihost_save_job.py"), str(directory),
                              str(out)], env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stderr[-3000:]
        results.append(last_json(stdout))
    assert [r["process"] for r in results] == [0, 1] and all(r["processes"] == 2 for r in results)
    assert all(r["sharded_across_processes"] > 0 and r["written_when_returned"] for r in results)
    assert [p.name for p in out.parent.iterdir()] == ["saved"]  # no temporary directory left
    ours, theirs = load_file(out / "model.safetensors"), load_file(directory / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
