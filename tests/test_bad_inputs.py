"""Inputs that used to hang or end in a traceback: one line and a non-zero exit now."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from subllm.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def one_line(capsys, code: int, argv: list[str], fragment: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    return err[0]


def test_prepare_skips_a_fifo_in_a_directory_and_refuses_one_as_input(tmp_path, capsys,
                                                                        write_corpus):
    corpus = write_corpus(tmp_path / "corpus", 6)
    os.mkfifo(corpus / "pipe")  # reading it would block forever
    assert main(["prepare", "--input", str(corpus), "--out", str(tmp_path / "data"),
                 "--vocab-size", "280"]) == 0
    assert "1 not regular files skipped" in capsys.readouterr().out
    one_line(capsys, 2, ["prepare", "--input", str(corpus / "pipe"), "--out",
                         str(tmp_path / "d2")], "is not a regular file")
    assert not (tmp_path / "d2").exists()


def test_prepare_names_a_directory_of_hidden_files(tmp_path, capsys):
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".notes.txt").write_text("text")
    one_line(capsys, 2, ["prepare", "--input", str(tmp_path / "hidden"), "--out",
                         str(tmp_path / "d")], "hidden files and folders are skipped")


@pytest.mark.slow
def test_nan_temperature_is_one_line_through_the_real_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "subllm", "generate", "--checkpoint",
                        str(tmp_path), "--temperature", "nan"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "subllm generate: error: --temperature must be a finite number >= 0 (0 = greedy), "
        "got nan"]


def test_generate_refuses_nan_temperature_in_python_too() -> None:
    import torch

    from subllm import ModelConfig, SubLLM, SubLLMError

    model = SubLLM(ModelConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, ffn_dim=32,
                               max_seq_len=32)).eval()
    with pytest.raises(SubLLMError, match="finite number >= 0"):
        model.generate(torch.tensor([[1, 2, 3]]), 4, temperature=float("nan"))


def test_bench_out_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("keep me")
    one_line(capsys, 2, ["bench", "startup", "--out", str(blocker)], "is a file")
    one_line(capsys, 1, ["bench", "mst", "--model", "llama-tiny", "--seq-lens", "64",
                         "--out", str(blocker / "sub")], "a part of the path is a file")
    assert blocker.read_text() == "keep me"


def test_an_os_error_is_one_line_naming_the_path_and_what_to_do(tmp_path, capsys,
                                                                 monkeypatch):
    """Caught once at the CLI boundary, whatever verb raised it."""
    import subllm.commands.info as info

    def no_space(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(info, "run", no_space)
    line = one_line(capsys, 1, ["info", "subllm-tiny"], "No space left on device")
    assert str(tmp_path / "x") in line and "free some space" in line


def test_misleading_messages_now_say_what_is_wrong(tmp_path, capsys, prepare_corpus):
    data = prepare_corpus(tmp_path, 6)
    corpus = tmp_path / "corpus"
    capsys.readouterr()
    one_line(capsys, 2, ["prepare", "--input", str(corpus), "--tokenizer", str(tmp_path),
                         "--out", str(tmp_path / "d")], "is a directory, not a tokenizer.json")
    # a lowercase structure names the bad character (it used to report n_layers 0)
    one_line(capsys, 2, ["train", "--structure", "ttt(tt)t", "--out", str(tmp_path / "run"),
                         "--data", str(data)],
             "invalid character 't' at position 0")
    assert not (tmp_path / "d").exists() and not (tmp_path / "run").exists()


def test_a_truncated_train_bin_is_named_once(tmp_path, capsys, prepare_corpus):
    data = prepare_corpus(tmp_path, 6)
    capsys.readouterr()
    train_bin = data / "train.bin"
    with open(train_bin, "r+b") as f:
        f.truncate(train_bin.stat().st_size // 2)
    line = one_line(capsys, 2, ["train", "--data", str(data), "--out", str(tmp_path / "run"),
                                "--preset", "llama-tiny", "--max-steps", "1"],
                    "the directory is damaged")
    assert "SubLLMError(" not in line and line.count("subllm prepare") == 1
    assert not (tmp_path / "run").exists()


def test_second_sweep_inputs_are_one_line_and_touch_nothing(tmp_path, capsys,
                                                            prepare_corpus) -> None:
    """Found by a sweep of ~475 inputs: each used to trace back, destroy data or do the
    wrong thing quietly."""
    data = prepare_corpus(tmp_path, 6)
    capsys.readouterr()
    cfg = tmp_path / "c.yaml"
    one_line(capsys, 2, ["bench"], "name a benchmark: mst")  # was a RecursionError
    for text, fragment in (("max-steps: null\n", "`max-steps` is null"),
                           ("lr: null\n", "`lr` is null"), ("data: null\n", "`data` is null"),
                           ("seq-len: true\n", "`seq-len` must be a value like the flag")):
        cfg.write_text(text)
        one_line(capsys, 2, ["train", "--config", str(cfg), "--out", str(tmp_path / "r")],
                 fragment)
    one_line(capsys, 2, ["train", "--data", str(data), "--out", str(tmp_path / "r"),
                         "--seq-len", "1"], "needs at least 2 tokens")
    for argv in (["train", "--data", str(data), "--out", ""],
                 ["prepare", "--input", str(tmp_path / "corpus"), "--out", ""]):
        with pytest.raises(SystemExit, match="2"):  # a usage error, as argparse exits
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "argument --out: is empty" in err[0], err
    assert not (tmp_path / "r").exists()
    # --force replaces an earlier export, never a data directory or anything else
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    one_line(capsys, 2, ["export", "--checkpoint", str(tmp_path / "nowhere"), "--out",
                         str(data), "--force"], "--force replaces only an earlier export")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    # prepare into its own corpus would read its outputs as documents next time
    one_line(capsys, 2, ["prepare", "--input", str(tmp_path / "corpus"), "--out",
                         str(tmp_path / "corpus" / "prepared")], "lies inside the input")
    assert not (tmp_path / "corpus" / "prepared").exists()
