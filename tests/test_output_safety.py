"""What `jaxmerge merge`, `convert` and `jaxmerge.save` may write, replace or leave behind:
never an input or a user's files, nothing half-written after an error or a kill, every
error one line before any work."""

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_hf_model
from safetensors.numpy import load_file
from test_checkpoint import add_tokenizer

import jaxmerge
import jaxmerge.checkpoint as checkpoint
import jaxmerge.merge.stream as stream
import jaxmerge.saving as saving
from jaxmerge import CheckpointError
from jaxmerge.cli import main
from jaxmerge.merge.plan import RecipeError
from jaxmerge.merge.recipe import merge_from_yaml, parse_recipe

UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base and a fine-tune of it (2 layers), with a tokenizer; and a model without one."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("base", 0), ("ft", 1), ("bare", 2)):
        make_hf_model("mistral_gqa", seed=seed, num_hidden_layers=2).save_pretrained(root / name)
        if name != "bare":
            add_tokenizer(root / name)
    return root


def write_recipe(path: Path, models: Path, extra: str = "") -> Path:
    path.write_text(textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {models}/base
        models:
          - model: {models}/ft
            parameters: {{weight: 0.5}}
        """) + extra)
    return path


def no_loading(monkeypatch):
    """Makes reading weights fail the test: the error must come before any weights are read
    (a merge reads tensors one by one, `jaxmerge.load` whole models)."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(stream.Models, "read", load)
    monkeypatch.setattr(checkpoint, "load", load)


def tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def succeeds(capsys, argv: list[str]) -> None:
    assert main(argv) == 0
    capsys.readouterr()  # progress bars


def one_line_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+/\d+ \[", line)]  # not tqdm's
    assert "Traceback" not in err and len(lines) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ------------------------------------------------------------------ 1. --overwrite replaces only a model output


def test_overwrite_keeps_a_directory_of_user_files(models, tmp_path, capsys):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "train.jsonl").write_text("{}\n")
    (work / "notes.txt").write_text("mine")
    recipe = write_recipe(work / "recipe.yml", models)
    before = tree(work)
    assert main(["merge", str(recipe), str(work), "--overwrite"]) == 2
    one_line_error(capsys, "recipe.yml")  # the recipe being run is in it
    (work / "recipe.yml").rename(tmp_path / "recipe.yml")
    assert main(["merge", str(tmp_path / "recipe.yml"), str(work), "--overwrite"]) == 2
    one_line_error(capsys, "notes.txt", "data/")
    (tmp_path / "recipe.yml").rename(work / "recipe.yml")
    assert tree(work) == before
    # A model output with one stray file is not replaced either.
    succeeds(capsys, ["merge", str(recipe), str(tmp_path / "out")])
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--overwrite"]) == 2
    one_line_error(capsys, "notes.txt")
    (tmp_path / "out" / "notes.txt").unlink()
    succeeds(capsys, ["merge", str(recipe), str(tmp_path / "out"), "--overwrite"])  # a previous output: replaced


def test_overwrite_never_removes_the_recipe_being_run(models, tmp_path, capsys):
    out = tmp_path / "out"
    succeeds(capsys, ["merge", str(write_recipe(tmp_path / "r.yml", models)), str(out)])
    saved = out / "mergekit_config.yml"  # re-running the recipe an output carries, into that output
    before = tree(out)
    assert main(["merge", str(saved), str(out), "--overwrite"]) == 2
    one_line_error(capsys, "input file", "mergekit_config.yml")
    assert tree(out) == before


def test_save_and_convert_overwrite_only_a_model_output(models, tmp_path, capsys):
    model = jaxmerge.load(models / "ft")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text("{}")
    (busy / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"busy: not replaced: .*keep\.txt"):
        jaxmerge.save(model, busy, overwrite=True)
    assert main(["convert", str(models / "ft"), str(busy), "--overwrite"]) == 2
    one_line_error(capsys, "keep.txt")
    assert sorted(os.listdir(busy)) == ["config.json", "keep.txt"]
    only_config = tmp_path / "only_config"  # not an output either: no weights
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a previous model output"):
        jaxmerge.save(model, only_config, overwrite=True)
    # A transformers checkpoint with its tokenizer, and a sharded output, are replaced.
    shutil.copytree(models / "base", tmp_path / "hf")
    jaxmerge.save(model, tmp_path / "sharded", shard_size="20KB")
    for out in (tmp_path / "hf", tmp_path / "sharded"):
        succeeds(capsys, ["convert", str(models / "bare"), str(out), "--overwrite", "--dtype", "bfloat16"])
        assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()


# ------------------------------------------------------------------ 2. every path a recipe reads is an input


def test_tokenizer_source_is_never_the_output(models, tmp_path, capsys):
    tok = tmp_path / "tok"
    make_hf_model("mistral_gqa", seed=2, num_hidden_layers=2).save_pretrained(tok)
    add_tokenizer(tok)
    recipe = write_recipe(tmp_path / "r.yml", models, f"tokenizer_source: {tok}\n")
    before = tree(tok)
    (tmp_path / "link").symlink_to(tok)
    for out in (tok, tok / "inside", tmp_path / "link", tmp_path):
        assert main(["merge", str(recipe), str(out), "--overwrite"]) == 2
        one_line_error(capsys, "input")
    assert tree(tok) == before


def test_relative_and_absolute_paths_name_one_input(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(models)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: ./base\nmodels:\n  - model: {models}/base\n"
                      f"  - model: ft\n    parameters: {{weight: 1.0, density: 0.5}}\n")
    parsed = parse_recipe(recipe.read_text())
    assert [s.model for s in parsed.slices[0].sources] == [str(models / "base"), str(models / "ft")]
    before = tree(models / "base")
    assert main(["merge", str(recipe), "base/../base", "--overwrite"]) == 2
    one_line_error(capsys, "input model directory")
    assert tree(models / "base") == before
    recipe.write_text("merge_method: linear\nmodels:\n  - model: ft\n    parameters: {weight: 1.0}\n"
                      "  - model: ./ft/\n    parameters: {weight: 2.0}\n")
    with pytest.raises(RecipeError, match=r"models\[1\]: .*ft is listed twice \(also recipe\.models\[0\]\)"):
        merge_from_yaml(recipe, tmp_path / "out")


# ------------------------------------------------------------------ 3. temporaries: killed saves, SIGTERM, symlinks

SLOW_CHILD = r"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
import jaxmerge.merge.stream as stream
real = stream.ShardWriter.__init__
def slow(self, *args, **kwargs):  # the merge's shards are on disk (laid out, not yet filled)
    real(self, *args, **kwargs)
    print("WRITING", flush=True)
    time.sleep(120)
stream.ShardWriter.__init__ = slow
from jaxmerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_slow_merge(models, tmp_path):
    """A `jaxmerge merge` child (tokenizer_source: base) whose first shard write stalls; returns it
    once the shard is on disk. Its TMPDIR is private, to see what it leaves there."""
    recipe = write_recipe(tmp_path / "r.yml", models, "tokenizer_source: base\n")
    (tmp_path / "tmpdir").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmpdir"), "JAXMERGE_CACHE_DIR": "off"}
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, "merge", str(recipe), str(tmp_path / "out"),
                              "--shard-size", "20KB"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    line = child.stdout.readline()
    while line and "WRITING" not in line:
        line = child.stdout.readline()
    assert "WRITING" in line, child.communicate()[1][-3000:]
    return recipe, child


def test_killed_save_is_cleaned_up_by_the_next(models, tmp_path, capsys):
    recipe, child = start_slow_merge(models, tmp_path)
    child.kill()
    child.communicate()
    left = leftovers(tmp_path, "out")
    assert len(left) == 1 and re.fullmatch(rf"\.out\.jaxmerge-\w+-{child.pid}-[0-9a-f]{{8}}\.tmp", left[0]), left
    assert list((tmp_path / "tmpdir").iterdir()) == []  # nothing in /tmp
    succeeds(capsys, ["merge", str(recipe), str(tmp_path / "out"), "--shard-size", "20KB"])
    assert leftovers(tmp_path, "out") == []
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.parametrize("sig,returncode", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_sigterm_or_ctrl_c_during_save_removes_the_temporary(models, tmp_path, sig, returncode):
    _, child = start_slow_merge(models, tmp_path)
    child.send_signal(sig)
    _, err = child.communicate(timeout=180)  # a loaded CI machine is slow to start and end processes
    # SIGTERM ends the process by the signal, as it does by default (a shell shows 143); Ctrl-C: 130.
    assert child.returncode == returncode and "Traceback" not in err, err[-3000:]
    assert leftovers(tmp_path, "out") == [] and not (tmp_path / "out").exists()
    assert list((tmp_path / "tmpdir").iterdir()) == []


def test_only_dead_processes_temporaries_are_removed(models, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())
    names = {
        f".out.jaxmerge-{host}-{dead.pid}-0123abcd.tmp": False,  # removed
        f".out.jaxmerge-{host}-{dead.pid}-4567abcd.old": False,
        f".out.jaxmerge-{host}-{os.getppid()}-89abcdef.tmp": True,  # a live process's
        f".out.jaxmerge-otherhost-{dead.pid}-0123abcd.tmp": True,  # another host's
        ".out.x1y2z3.tmp": True,  # not ours
        f".outer.jaxmerge-{host}-{dead.pid}-0123abcd.tmp": True,  # another output's
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("partial")
    jaxmerge.save(jaxmerge.load(models / "ft"), tmp_path / "out")
    assert leftovers(tmp_path, "out") == sorted(n for n, kept in names.items() if kept and n.startswith(".out."))
    assert (tmp_path / f".outer.jaxmerge-{host}-{dead.pid}-0123abcd.tmp").is_dir()


def test_overwrite_through_a_symlink_writes_its_target(models, tmp_path):
    model = jaxmerge.load(models / "ft")
    jaxmerge.save(model, tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    jaxmerge.save(model, tmp_path / "link", overwrite=True, dtype="bfloat16")
    assert (tmp_path / "link").is_symlink()
    assert str(load_file(tmp_path / "real" / "model.safetensors")[UP].dtype) == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


# ------------------------------------------------------------------ 6. non-finite recipe numbers


@pytest.mark.parametrize("parameters,where", [
    ("models:\n  - model: A\n    parameters: {weight: 1.0}\n  - model: B\n    parameters: {weight: .nan}\n",
     r"recipe\.models\[1\]\.parameters\.weight: nan is not a finite number"),
    ("models:\n  - model: A\n    parameters: {weight: [0.1, .inf, 0.3]}\n",
     r"recipe\.models\[0\]\.parameters\.weight\[1\]: inf"),
    ("models:\n  - model: A\n    parameters: {weight: [{filter: mlp, value: -.inf}, {value: 1.0}]}\n",
     r"recipe\.models\[0\]\.parameters\.weight\[0\]\.value: -inf"),
    ("models:\n  - model: A\n    parameters: {weight: {filter: mlp, value: [1.0, .NaN]}}\n",
     r"recipe\.models\[0\]\.parameters\.weight\.value\[1\]: nan"),
    ("models:\n  - model: A\nparameters: {weight: \"nan\"}\n", r"recipe\.parameters\.weight: nan"),
    ("models:\n  - model: A\nparameters: {weight: heavy}\n", r"recipe\.parameters\.weight: expected a number"),
])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, parameters, where):
    (tmp_path / "r.yml").write_text("merge_method: linear\n" + parameters)
    with pytest.raises(RecipeError, match=rf"r\.yml: {where}"):
        merge_from_yaml(tmp_path / "r.yml", tmp_path / "out")


def test_numeric_strings_are_numbers_as_in_mergekit():
    recipe = parse_recipe("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1e-3}\n")
    assert recipe.slices[0].sources[0].parameters == {"weight": 1e-3}


# ------------------------------------------------------------------ 7. mixed dtypes


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """An fp16 base and bf16 / fp32 fine-tunes; the bf16 one has a weight of 2e5 (beyond fp16)."""
    root = tmp_path_factory.mktemp("mixed")
    for name, dtype, seed in (("base", torch.float16, 0), ("bf16", torch.bfloat16, 1), ("fp32", torch.float32, 2)):
        model = make_hf_model("mistral_gqa", seed=seed, num_hidden_layers=2)
        if name == "bf16":
            with torch.no_grad():
                model.model.layers[1].mlp.up_proj.weight[0, 0] = 2e5
        model.to(dtype).save_pretrained(root / name)
    return root


def mixed_recipe(tmp_path, mixed, extra=""):
    return write_recipe(tmp_path / "r.yml", mixed, extra).read_text().replace(
        f"  - model: {mixed}/ft\n    parameters: {{weight: 0.5}}\n",
        f"  - model: {mixed}/bf16\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {mixed}/fp32\n    parameters: {{weight: 0.1}}\n")


def test_mixed_dtypes_merge_in_their_promotion(mixed, tmp_path):
    (tmp_path / "r.yml").write_text(mixed_recipe(tmp_path, mixed))
    out = merge_from_yaml(tmp_path / "r.yml", tmp_path / "out", progress=False)
    tensors = load_file(out / "model.safetensors")
    assert {str(t.dtype) for t in tensors.values()} == {"float32"}  # as mergekit: fp16 + bf16 -> fp32
    assert tensors[UP][0, 0] == pytest.approx(2e5, rel=0.01)
    assert jaxmerge.load(out).dtype == "float32"


def test_overflowing_casts_are_refused_naming_the_tensor(mixed, tmp_path, capsys):
    (tmp_path / "r.yml").write_text(mixed_recipe(tmp_path, mixed, "dtype: float16\n"))
    with pytest.raises(RecipeError, match=rf"tensor {re.escape(UP)} of .*bf16: overflows float16"):
        merge_from_yaml(tmp_path / "r.yml", tmp_path / "out", progress=False)
    (tmp_path / "r.yml").write_text(mixed_recipe(tmp_path, mixed, "out_dtype: float16\n"))
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(UP)} overflows float16"):
        merge_from_yaml(tmp_path / "r.yml", tmp_path / "out", progress=False)
    assert main(["convert", str(mixed / "bf16"), str(tmp_path / "out"), "--dtype", "float16"]) == 2
    one_line_error(capsys, UP, "overflows float16")
    assert sorted(os.listdir(tmp_path)) == ["r.yml"]


def test_a_merge_overflowing_its_dtype_is_refused(models, tmp_path):
    write_recipe(tmp_path / "r.yml", models, "parameters: {lambda: 1.0e+6}\ndtype: float16\n")
    with pytest.raises(RecipeError, match=r"tensor model\.\S+: the merge in float16 gives inf"):
        merge_from_yaml(tmp_path / "r.yml", tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["r.yml"]


# ------------------------------------------------------------------ 9. permissions


def test_output_directory_mode_follows_the_umask(models, tmp_path):
    model = jaxmerge.load(models / "ft")
    for umask, mode in ((0o022, 0o755), (0o027, 0o750)):
        previous = os.umask(umask)
        try:
            out = jaxmerge.save(model, tmp_path / f"out{umask:o}")
        finally:
            os.umask(previous)
        assert out.stat().st_mode & 0o777 == mode
        assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------ 12. one-line errors before any work


def test_missing_or_unreadable_recipe(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.yml"), str(tmp_path / "out")]) == 2
    one_line_error(capsys, "nope.yml", "No such file")
    assert main(["merge", str(tmp_path), str(tmp_path / "out")]) == 2
    one_line_error(capsys, str(tmp_path), "Is a directory")
    (tmp_path / "bad.yml").write_text("merge_method: [linear\nmodels: {")
    assert main(["merge", str(tmp_path / "bad.yml"), str(tmp_path / "out")]) == 2
    one_line_error(capsys, "bad.yml", "not valid YAML (line")
    assert not (tmp_path / "out").exists()


def test_missing_recipe_from_a_shell():
    result = subprocess.run([sys.executable, "-m", "jaxmerge.cli", "merge", "/nonexistent/r.yml", "/nonexistent/o"],
                            capture_output=True, text=True, env={**os.environ, "JAXMERGE_CACHE_DIR": "off"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "jaxmerge merge: error: /nonexistent/r.yml: cannot read the recipe " \
                                    "(No such file or directory)"


@pytest.mark.parametrize("layer_range", ["[-1, 2]", "[1, 1]", "[0, 2.5]", "[true, 2]", "[0, 9]"])
def test_bad_layer_ranges_before_loading(models, tmp_path, monkeypatch, capsys, layer_range):
    no_loading(monkeypatch)
    (tmp_path / "r.yml").write_text(f"merge_method: passthrough\nslices:\n  - sources:\n"
                                    f"      - model: {models}/ft\n        layer_range: {layer_range}\n")
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2
    one_line_error(capsys, "slices[0].sources[0].layer_range")


def test_recipe_structure_errors_before_loading(models, tmp_path, monkeypatch, capsys):
    no_loading(monkeypatch)
    for text, message in (
        (f"merge_method: ties\nmodels:\n  - model: {models}/ft\n    parameters: {{weight: 1}}\n", "needs a base_model"),
        (f"merge_method: slerp\nbase_model: {models}/base\nmodels:\n  - model: {models}/base\n",
         "slerp takes exactly 1 model(s) besides the base, got 0"),
        (f"merge_method: linear\nmodels:\n  - model: {tmp_path}/missing\n", f"{tmp_path}/missing"),
        (f"merge_method: linear\nmodels:\n  - model: {models}/ft\n    parameters: {{weight: 1}}\n"
         f"tokenizer_source: {models}/bare\n", "cannot load its tokenizer"),
    ):
        (tmp_path / "r.yml").write_text(text)
        assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2
        one_line_error(capsys, message)


def test_bad_shard_size_and_dtype_before_loading(models, tmp_path, monkeypatch, capsys):
    no_loading(monkeypatch)
    recipe = write_recipe(tmp_path / "r.yml", models)
    for size in ("lots", "0", "1.2.3GB", "-5MB"):
        assert main(["merge", str(recipe), str(tmp_path / "out"), f"--shard-size={size}"]) == 2
        one_line_error(capsys, "shard size")
        assert main(["convert", str(models / "ft"), str(tmp_path / "out"), f"--shard-size={size}"]) == 2
        one_line_error(capsys, "shard size")
    assert main(["convert", str(models / "ft"), str(tmp_path / "out"), "--dtype", "fp8"]) == 2
    one_line_error(capsys, "unknown dtype 'fp8'")
    assert saving.parse_size("2GiB") == 2 * 1024**3 and saving.parse_size(" 500 mb ") == 500_000_000


def test_unwritable_output_before_loading(models, tmp_path, monkeypatch, capsys):
    no_loading(monkeypatch)
    recipe = write_recipe(tmp_path / "r.yml", models)
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "ro" and real_access(path, mode))
    assert main(["merge", str(recipe), str(tmp_path / "ro" / "new" / "out")]) == 2
    one_line_error(capsys, f"{tmp_path / 'ro'} is not writable")
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "exists and is not a directory"),
                         (tmp_path / "file" / "out", "is not a directory"),
                         (Path("/"), "filesystem root")):
        assert main(["merge", str(recipe), str(out), "--overwrite"]) == 2
        one_line_error(capsys, message)
        assert main(["convert", str(models / "ft"), str(out), "--overwrite"]) == 2
        one_line_error(capsys, message)
    assert not (tmp_path / "ro" / "new").exists()


def test_the_working_directory_is_never_replaced(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    jaxmerge.save(jaxmerge.load(models / "ft"), out)
    monkeypatch.chdir(out)
    no_loading(monkeypatch)
    for target in (".", str(out), ".."):
        assert main(["merge", str(write_recipe(tmp_path / "r.yml", models)), target, "--overwrite"]) == 2
        one_line_error(capsys, "current directory")


def test_disk_full_while_writing(models, tmp_path, monkeypatch, capsys):
    def full(self, key, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
    monkeypatch.setattr(stream.ShardWriter, "write", full)
    recipe = write_recipe(tmp_path / "r.yml", models)
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    one_line_error(capsys, "out: writing failed, nothing written (No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["r.yml"]


def test_file_size_limit_while_writing_from_a_shell(models, tmp_path):
    """A real write failure (RLIMIT_FSIZE: EFBIG, as a full disk fails), in safetensors' own writer."""
    limited = ["bash", "-c", 'ulimit -f 30 && exec "$0" "$@"', sys.executable]  # 30 KiB per file
    result = subprocess.run([*limited, "-m", "jaxmerge.cli", "convert", str(models / "ft"), str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "JAXMERGE_CACHE_DIR": "off"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "out: writing failed, nothing written" in result.stderr
    assert os.listdir(tmp_path) == []


def test_recipe_paths_in_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "r.yml").write_text("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\n"
                                    "dtype: int8\n")
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]) == 2
    one_line_error(capsys, "r.yml: recipe.dtype: unknown dtype 'int8'")


def test_a_previous_output_is_restored_if_the_swap_is_interrupted(models, tmp_path, monkeypatch):
    model = jaxmerge.load(models / "ft")
    out = jaxmerge.save(model, tmp_path / "out")
    before = tree(out)
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise KeyboardInterrupt
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        jaxmerge.save(model, out, overwrite=True, dtype="bfloat16")
    assert tree(out) == before and leftovers(tmp_path, "out") == []



@pytest.mark.parametrize("overwrite", [False, True])
def test_files_written_to_the_output_during_a_save_are_kept(models, tmp_path, monkeypatch, overwrite):
    """Another process writes into OUT while the save runs: the save fails rather than replace it."""
    model = jaxmerge.load(models / "ft")
    out = tmp_path / "out"
    if overwrite:
        jaxmerge.save(model, out)
    real = saving.save_file

    def meanwhile(arrays, path, metadata=None):
        real(arrays, path, metadata=metadata)
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("theirs")
    monkeypatch.setattr(saving, "save_file", meanwhile)
    with pytest.raises(CheckpointError, match="not empty" if not overwrite else r"not replaced: .*notes\.txt"):
        jaxmerge.save(model, out, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "theirs" and leftovers(tmp_path, "out") == []


# ------------------------------------------------------------------ 13. the streamed merge's writer and buffers

def test_shard_writer_writes_any_order_in_windows(tmp_path, monkeypatch):
    """Tensors written out of order, in requests and writeback windows smaller than a tensor,
    give the shards and index safetensors reads back."""
    monkeypatch.setattr(stream, "WRITE_CHUNK", 96)  # several requests per tensor, windows waited on
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.w": rng.standard_normal((i + 3, 7)).astype(np.float32) for i in range(6)}
    tensors["model.norm.weight"] = rng.standard_normal(5).astype(np.float16)
    writer = stream.ShardWriter(tmp_path, [(k, v.dtype, v.shape) for k, v in tensors.items()], shard_size=300)
    try:
        for key in sorted(tensors, key=writer.position, reverse=True):
            writer.write(key, tensors[key])
    finally:
        writer.close()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    back = {}
    for f in tmp_path.glob("*.safetensors"):
        back.update(load_file(f))
    assert back.keys() == tensors.keys() and all(np.array_equal(back[k], tensors[k]) for k in tensors)


def test_buffer_pool_keeps_a_buffer_while_its_size_is_to_come():
    pool = stream.BufferPool([64, 64, 128])
    first = pool.take((16,), np.float32)
    assert first.ctypes.data % 64 == 0
    pool.give([first])
    again = pool.take((32,), np.float16)  # the same bytes in another dtype: the same buffer
    assert again.ctypes.data == first.ctypes.data and again.dtype == np.float16
    pool.give([again])  # no more takes of 64 bytes to come: dropped
    assert pool.free[64] == []
    assert pool.take((2, 16), np.float32).shape == (2, 16)
