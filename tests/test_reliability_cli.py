"""Issue-12 classes of failure, each through the real CLI (`python -m subllm` in a subprocess):
the exit code, a single stderr line with no traceback, and every input and earlier output
byte-identical afterwards. An operating-system error the test cannot cause for real (a full
disk) is injected into the subprocess by a `sitecustomize` module on its PYTHONPATH."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from procs import SRC, cli, one_line, snapshot

from subllm.cli import main

pytestmark = pytest.mark.slow  # ~40 subprocesses, each importing torch

@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, prepare_corpus, tiny_settings) -> Path:
    """data/ (prepared), tiny.yaml, run/ (checkpoints at steps 2 and 4 of 6) and hf/ (its
    export), made in-process; the tests copy what they change."""
    root = tmp_path_factory.mktemp("reliability-cli")
    prepare_corpus(root, 40, lines=40)
    settings = tiny_settings(root / "data", **{"save-every": 2, "max-steps": 6})
    (root / "tiny.yaml").write_text(yaml.safe_dump(settings))
    assert main(["train", "--config", str(root / "tiny.yaml"), "--out", str(root / "run"),
                 "--stop-at", "4"]) == 0
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "hf")]) == 0
    return root


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, work: Path) -> Path:
    """A random two-layer Llama saved with save_pretrained (its tokenizer: the data's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=128)).save_pretrained(d)
    return d


def copy_run(work: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(work / "run", run)
    return run


# 1. -------------------------------------------------------------------------------------------
# (--out RUN, RUN/checkpoints, the newest checkpoint, a folder holding RUN, and convert's
# --out X for input X are in test_output_safety.py; these are the other spellings.)
def test_1_an_output_overlapping_an_input_is_refused_before_any_work(work: Path, llama: Path,
                                                                      tmp_path: Path) -> None:
    run = copy_run(work, tmp_path)
    before = snapshot(run, llama)
    step = run / "checkpoints" / "step-00000004"
    cases = [
        (["export", "--checkpoint", str(step), "--out", str(run), "--force"], "contains"),
        (["export", "--checkpoint", str(run), "--out", f"{run}/../{run.name}/", "--force"],
         "is the input"),
        (["export", "--checkpoint", str(step), "--out", str(step / "hf"), "--force"],
         "lies inside"),
        (["convert", "--from-hf", str(llama), "--out", str(llama / "inner"), "--force"],
         "lies inside"),
        (["convert", "--from-hf", str(llama), "--tokenizer", str(work / "data"), "--out",
          str(work / "data"), "--force"], "is the input"),
    ]
    for argv, how in cases:
        one_line(cli(*argv), 2, "--out", how, "would destroy the input")
        assert snapshot(run, llama) == before, argv


# 2. -------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from subllm.atomic import dir_lock
with dir_lock(Path(sys.argv[1]), "training process"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_2_a_second_process_on_a_run_is_refused_and_a_killed_ones_lock_does_not_block(
        work: Path, tmp_path: Path) -> None:
    run = copy_run(work, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        one_line(cli("train", "--out", str(run), "--resume"), 2,
                 f"pid {holder.pid}", "in use by another training process")
        assert snapshot(run) == before
        fresh = tmp_path / "fresh"  # also a new run into a directory in use
        fresh.mkdir()
        holder2 = subprocess.Popen([sys.executable, "-c", HOLD, str(fresh)],
                                   stdout=subprocess.PIPE, text=True, env=env)
        assert holder2.stdout.readline().strip() == "locked"
        before_fresh = snapshot(fresh)
        one_line(cli("train", "--config", str(work / "tiny.yaml"), "--out", str(fresh)), 2,
                 f"pid {holder2.pid}")
        assert snapshot(fresh) == before_fresh  # no config.yaml, no metrics.jsonl
        holder2.kill()
        holder2.wait()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock
        holder.wait()
    r = cli("train", "--out", str(run), "--resume")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert (run / "checkpoints" / "step-00000006").is_dir()


# 3. -------------------------------------------------------------------------------------------
def test_3_info_and_estimate_mean_the_model_training_built(work: Path) -> None:
    import json

    from subllm import ModelConfig, SubLLM

    cfg = json.loads((work / "run" / "checkpoints" / "step-00000004" /
                      "model_config.json").read_text())
    params = f"{SubLLM(ModelConfig.from_dict(cfg)).num_params():,}"
    before = snapshot(work / "run", work / "tiny.yaml", work / "hf")
    for spec in (work / "run" / "config.yaml", work / "tiny.yaml", work / "run",
                 work / "run" / "checkpoints" / "step-00000002", work / "hf"):
        r = cli("info", str(spec))
        assert r.returncode == 0 and r.stderr == "", (spec, r.stderr)
        assert f"parameters    {params} " in r.stdout, (spec, r.stdout)
        assert "T(T(TT)T)T" in r.stdout
    r = cli("estimate", "--config", str(work / "run" / "config.yaml"), "--seq-len", "64")
    assert r.returncode == 0 and r.stderr == "" and "T(T(TT)T)T" in r.stdout, r.stderr
    assert snapshot(work / "run", work / "tiny.yaml", work / "hf") == before
    # a file that means nothing training would build is refused, not guessed at
    odd = work / "odd.yaml"
    odd.write_text("preset: subllm-tiny\nlayers_please: 3\n")
    one_line(cli("info", str(odd)), 2, "layers_please")


# 4. -------------------------------------------------------------------------------------------
NO_SPACE_AT_CHECKPOINT = """
import errno
import subllm.train.checkpoint as ckpt
def full(path, state):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
ckpt._write_weights = full
"""


def test_4_no_space_at_a_checkpoint_keeps_the_last_one_and_names_it(work: Path,
                                                                     tmp_path: Path) -> None:
    run = copy_run(work, tmp_path)
    before = snapshot(run / "checkpoints")
    line = one_line(cli("train", "--out", str(run), "--resume", cwd=tmp_path,
                        inject=NO_SPACE_AT_CHECKPOINT), 2,
                    "No space left on device", "while writing checkpoint step-00000006",
                    "step-00000004 is intact")
    assert "--resume" in line
    assert snapshot(run / "checkpoints") == before  # step-4 as it was, no .tmp-* left


def test_4_an_output_path_in_the_way_is_one_line_and_untouched(work: Path,
                                                                tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me\n")
    before = snapshot(blocker, work / "run")
    one_line(cli("prepare", "--input", str(work / "corpus"), "--out", str(blocker)), 2,
             str(blocker))
    one_line(cli("export", "--checkpoint", str(work / "run"), "--out",
                 str(blocker / "hf")), 1, "in the way")
    one_line(cli("train", "--config", str(work / "tiny.yaml"), "--out", str(blocker)), 2,
             "is a file")
    one_line(cli("bench", "estimate", "--out", str(blocker)), 1, str(blocker))
    assert snapshot(blocker, work / "run") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


# 5. -------------------------------------------------------------------------------------------
def _garbage(p: Path) -> None:
    p.write_bytes(b"not a checkpoint\n" * 10)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.parametrize("file, damage", [("state.pt", _garbage), ("state.pt", Path.unlink),
                                          ("state.pt", _truncate),
                                          ("model.safetensors", _truncate)])
def test_5_a_damaged_newest_checkpoint_is_named_and_the_intact_one_offered(
        work: Path, tmp_path: Path, file: str, damage) -> None:
    run = copy_run(work, tmp_path)
    newest = run / "checkpoints" / "step-00000004"
    damage(newest / file)
    before = snapshot(run)
    line = one_line(cli("train", "--out", str(run), "--resume"), 2,
                    "step-00000004 is damaged", "step-00000002", "--skip-damaged")
    assert "weights_only" not in line
    assert snapshot(run) == before
    if file == "model.safetensors":  # eval needs no optimizer state, but the weights
        one_line(cli("eval", "--checkpoint", str(run)), 2, "damaged", "step-00000002")
    # the flag takes the offer: the damaged one is kept aside, byte for byte
    r = cli("train", "--out", str(run), "--resume", "--skip-damaged")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "warning: checkpoint step-00000004 is damaged" in r.stderr
    assert "resuming from step-00000002" in r.stderr
    aside = run / "checkpoints" / "damaged-step-00000004"
    assert {k.replace(str(aside), str(newest)): v for k, v in snapshot(aside).items()} == {
        k: v for k, v in before.items() if k.startswith(str(newest) + os.sep)}
    assert (run / "checkpoints" / "step-00000006" / "state.pt").is_file()


# 6. -------------------------------------------------------------------------------------------
def test_6_leftovers_of_killed_exports_and_failed_starts_are_cleaned(work: Path,
                                                                      tmp_path: Path) -> None:
    stale = tmp_path / ".hf.tmp-999999999-dead"  # a killed export's staging (no such pid)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    r = cli("export", "--checkpoint", str(work / "run"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    before = snapshot(work / "data")
    # data shorter than one training sequence: a failed start
    one_line(cli("train", "--data", str(work / "data"), "--out", str(tmp_path / "new"),
                 "--seq-len", "4096", "--device", "cpu"), 2, "seq")
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(cli("train", "--data", str(work / "data"), "--out", str(empty), "--seq-len",
                 "4096", "--device", "cpu"), 2)
    assert list(empty.iterdir()) == []  # no config.yaml, no lock file
    assert snapshot(work / "data") == before


# 7. -------------------------------------------------------------------------------------------
def test_7_no_hang_and_no_traceback(work: Path, tmp_path: Path, write_corpus) -> None:
    corpus = write_corpus(tmp_path / "corpus", 6)
    os.mkfifo(corpus / "pipe")  # reading it would block forever
    t0 = time.monotonic()
    r = cli("prepare", "--input", str(corpus), "--out", str(tmp_path / "data"),
            "--vocab-size", "280", timeout=120)
    assert r.returncode == 0 and "1 not regular files skipped" in r.stdout, r.stderr
    assert time.monotonic() - t0 < 120
    one_line(cli("generate", "--checkpoint", str(work / "run"), "--temperature", "nan"), 2,
             "--temperature must be a finite number")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("preset: subllm-tiny\n# caf\u00e9\n".encode("latin-1"))
    one_line(cli("info", str(latin)), 2, "not UTF-8")
    one_line(cli("train", "--config", str(latin)), 2, "not UTF-8")
    blocker = tmp_path / "out.json"
    blocker.write_text("{}")
    one_line(cli("bench", "estimate", "--out", str(blocker)), 1, str(blocker))
    assert blocker.read_text() == "{}"


# 8. -------------------------------------------------------------------------------------------
def test_8_messages_say_what_is_wrong(work: Path, tmp_path: Path, write_corpus) -> None:
    one_line(cli("train", "--config", str(work / "tiny.yaml"), "--out", str(tmp_path / "r"),
                 "--structure", "t(tt)t"), 2, "invalid character 't' at position 0")
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    one_line(cli("prepare", "--input", str(work / "corpus"), "--out", str(tmp_path / "d"),
                 "--tokenizer", str(tokdir)), 2, "is a directory, not a tokenizer.json")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".notes.txt").write_text("text")
    one_line(cli("prepare", "--input", str(hidden), "--out", str(tmp_path / "d")), 2,
             "hidden files and folders are skipped")
    # export into an existing non-empty directory: refused before any work
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("mine")
    one_line(cli("export", "--checkpoint", str(work / "run"), "--out", str(full)), 2,
             "--force")
    assert (full / "mine.txt").read_text() == "mine" and len(list(full.iterdir())) == 1
    # a truncated train.bin: named once
    data = tmp_path / "data-cut"
    shutil.copytree(work / "data", data)
    _truncate(data / "train.bin")
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:-1])  # odd length
    line = one_line(cli("train", "--config", str(work / "tiny.yaml"), "--data", str(data),
                        "--out", str(tmp_path / "r")), 2, "train.bin")
    assert line.count("prepare") <= 1 and "Error(" not in line, line
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "d").exists()


def test_8_resume_after_the_data_was_reprepared_names_the_data(work: Path, tmp_path: Path,
                                                                 write_corpus) -> None:
    run = copy_run(work, tmp_path)
    other = tmp_path / "other"
    write_corpus(tmp_path / "corpus2", 30, seed=7, words="one two three four five".split())
    assert cli("prepare", "--input", str(tmp_path / "corpus2"), "--out", str(other),
               "--vocab-size", "280").returncode == 0
    before = snapshot(run)
    one_line(cli("train", "--out", str(run), "--resume", "--data", str(other)), 2,
             "tokenized with a different tokenizer", str(work / "data"))
    assert snapshot(run) == before


def test_8_relative_paths_are_stored_resolved(work: Path, tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    shutil.copytree(work / "data", a / "data")
    r = cli("train", "--config", str(work / "tiny.yaml"), "--data", "data", "--out", "run",
            "--max-steps", "2", cwd=a)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = yaml.safe_load((a / "run" / "config.yaml").read_text())
    assert saved["data"] == str(a / "data")
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    r = cli("eval", "--checkpoint", str(a / "run"), "--batches", "1", cwd=elsewhere)
    assert r.returncode == 0 and "val loss" in r.stdout, r.stderr[-2000:]
    r = cli("train", "--out", str(a / "run"), "--resume", "--max-steps", "4", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-2000:]


# 9. -------------------------------------------------------------------------------------------
HF_GENERATE = """
import sys, warnings
warnings.simplefilter("always")
import torch
from transformers import AutoModelForCausalLM
import subllm  # registers the Auto classes
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
print(out.shape[1])
"""


def test_9_no_library_noise_over_our_messages(work: Path, llama: Path, tmp_path: Path) -> None:
    r = cli("export", "--checkpoint", str(work / "run"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = cli("convert", "--from-hf", str(llama), "--tokenizer", str(work / "data"), "--out",
            str(tmp_path / "hf2"))
    assert r.returncode == 0, r.stderr
    for noise in ("Writing model shards", "Loading weights", "Traceback"):
        assert noise not in r.stderr and noise not in r.stdout, r.stderr
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    g = subprocess.run([sys.executable, "-c", HF_GENERATE, str(tmp_path / "hf")],
                       capture_output=True, text=True, env=env, timeout=180)
    assert g.returncode == 0 and g.stdout.strip() == "7", g.stderr[-2000:]
    assert "past_key_values" not in g.stderr and "Loading weights" not in g.stderr, g.stderr
