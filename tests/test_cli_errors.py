"""Bad input to prepare / train / generate / eval: one line on stderr, exit 2, no traceback,
nothing half-written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from subllm.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_MODEL = {"dim": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 6,
              "structure": "T(T(TT)T)T", "max_seq_len": 128}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, prepare_corpus) -> Path:
    """Prepared data, a tiny config, and a one-step run to generate from."""
    root = tmp_path_factory.mktemp("errors")
    # 20 one-line docs of 400 words "aaa".."hhh", seed 1, vocab 300
    prepare_corpus(root, 20, seed=1, words=[c * 3 for c in "abcdefgh"], words_per_line=400,
                   lines=1, name="{i}.txt")
    cfg = {"data": str(root / "data"), "preset": "subllm-tiny", "model": TINY_MODEL,
           "seq-len": 64, "batch-size": 2, "max-steps": 1, "eval-batches": 1, "device": "cpu"}
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(root / "tiny.yaml"), "--out", str(root / "run")]) == 0
    return root


def yaml_file(work: Path, name: str, text: str) -> str:
    path = work / name
    path.write_text(text)
    return str(path)


def with_model(work: Path, name: str, **model: object) -> str:
    cfg = yaml.safe_load((work / "tiny.yaml").read_text())
    cfg["model"] = {**cfg["model"], **model}
    return yaml_file(work, name, yaml.safe_dump(cfg))


def binary_dir(work: Path) -> str:
    d = work / "binary_only"
    d.mkdir(exist_ok=True)
    (d / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    (d / "b.so").write_bytes(b"\x7fELF\x00\x00")
    return str(d)


def empty_dir(work: Path) -> str:
    d = work / "empty_dir"
    d.mkdir(exist_ok=True)
    return str(d)


def a_file(work: Path) -> Path:
    f = work / "a_file"
    f.write_text("not a directory")
    return f


def other_tokenizer_data(work: Path) -> str:
    out = work / "other_data"
    if not out.exists():
        src = work / "other.txt"
        src.write_text("completely different text for another tokenizer " * 50)
        assert main(["prepare", "--input", str(src), "--out", str(out),
                     "--vocab-size", "280"]) == 0
    return str(out)


# (name, argv builder, expected fragment of the message, path that must not appear)
CASES: list[tuple[str, Callable[[Path], list[str]], str, str | None]] = [
    ("prepare-missing-input",
     lambda w: ["prepare", "--input", str(w / "nope"), "--out", str(w / "o1")],
     "does not exist", "o1"),
    ("prepare-empty-dir",
     lambda w: ["prepare", "--input", empty_dir(w), "--out", str(w / "o2")], "is empty", "o2"),
    ("prepare-empty-file",
     lambda w: ["prepare", "--input", yaml_file(w, "empty.txt", ""), "--out", str(w / "o3")],
     "no text found", "o3"),
    ("prepare-binary-only",
     lambda w: ["prepare", "--input", binary_dir(w), "--out", str(w / "o4")],
     "2 binary", "o4"),
    ("prepare-bad-tokenizer",
     lambda w: ["prepare", "--input", str(w / "corpus"), "--out", str(w / "o5"),
                "--tokenizer", yaml_file(w, "tok.json", "{not json")],
     "not a Hugging Face tokenizer.json", "o5"),
    ("prepare-unwritable-out",
     lambda w: ["prepare", "--input", str(w / "corpus"), "--out", str(a_file(w) / "sub")],
     "choose a writable --out", None),
    ("train-tokenizer-exceeds-model-vocab",
     lambda w: ["train", "--config", with_model(w, "v.yaml", vocab_size=100), "--out",
                str(w / "r1")], "raise model.vocab_size to at least", "r1"),
    ("train-seq-len-above-context",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--seq-len", "512", "--out",
                str(w / "r2")], "exceeds the model's context", "r2"),
    ("train-unknown-config-key",
     lambda w: ["train", "--config", yaml_file(w, "k.yaml", "max-step: 10\n"), "--out",
                str(w / "r3")], "did you mean `max-steps`", "r3"),
    ("train-unknown-model-key",
     lambda w: ["train", "--config", with_model(w, "m.yaml", n_layer=4), "--out",
                str(w / "r4")], "did you mean 'n_layers'", "r4"),
    ("train-malformed-yaml",
     lambda w: ["train", "--config", yaml_file(w, "bad.yaml", "lr: [1, 2\nseq-len: 3\n"),
                "--out", str(w / "r5")], "is not valid YAML at line", "r5"),
    ("train-missing-config",
     lambda w: ["train", "--config", str(w / "none.yaml"), "--out", str(w / "r6")],
     "does not exist", "r6"),
    ("train-zero-batch-size",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--batch-size", "0", "--out",
                str(w / "r7")], "must be a positive integer", "r7"),
    ("train-negative-steps",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--max-steps", "-5", "--out",
                str(w / "r8")], "must be a positive integer", "r8"),
    ("train-zero-lr",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--lr", "0", "--out",
                str(w / "r9")], "must be a positive number", "r9"),
    ("train-negative-lr-in-yaml",
     lambda w: ["train", "--config", yaml_file(w, "lr.yaml", "lr: -0.1\n"), "--out",
                str(w / "r10")], "`lr`: must be a positive number", "r10"),
    ("train-zero-batch-in-yaml",
     lambda w: ["train", "--config", yaml_file(w, "b.yaml", "batch-size: 0\n"), "--out",
                str(w / "r11")], "`batch-size`: must be a positive integer", "r11"),
    ("train-malformed-structure",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--structure", "TT(T(TT)T",
                "--out", str(w / "r12")], "is never closed", "r12"),
    ("train-structure-bad-char",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--structure", "TTxT",
                "--out", str(w / "r13")], "invalid character 'x' at position 2", "r13"),
    ("train-missing-data",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--data", str(w / "nodata"),
                "--out", str(w / "r14")], "subllm prepare", "r14"),
    ("train-resume-nothing",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--resume", "--out",
                str(w / "r15")], "no complete checkpoint", "r15"),
    ("train-existing-run-without-resume",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--out", str(w / "run")],
     "pass --resume", None),
    ("train-unwritable-out",
     lambda w: ["train", "--config", str(w / "tiny.yaml"), "--out", str(a_file(w) / "run")],
     "choose a writable --out", None),
    ("generate-missing-checkpoint",
     lambda w: ["generate", "--checkpoint", str(w / "norun"), "--prompt", "x"],
     "does not exist", None),
    ("generate-prompt-longer-than-context",
     lambda w: ["generate", "--checkpoint", str(w / "run"), "--prompt", "abc " * 400,
                "--device", "cpu"], "more than the model's context of 128", None),
    ("eval-missing-checkpoint",
     lambda w: ["eval", "--checkpoint", str(w / "norun")], "does not exist", None),
    ("eval-run-without-checkpoints",
     lambda w: ["eval", "--checkpoint", empty_dir(w)], "no complete checkpoint", None),
    ("eval-data-from-another-tokenizer",
     lambda w: ["eval", "--checkpoint", str(w / "run"), "--data", other_tokenizer_data(w),
                "--device", "cpu"], "different tokenizer", None),
]


@pytest.mark.parametrize("name,argv,message,absent", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(work: Path, capsys: pytest.CaptureFixture, name: str,
                                     argv: Callable[[Path], list[str]], message: str,
                                     absent: str | None) -> None:
    args = argv(work)
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse rejects bad flag values itself
        rc = e.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1, captured.err
    assert message in lines[0], lines[0]
    assert lines[0].startswith(f"subllm {args[0]}: error: ")
    assert "Traceback" not in captured.err
    if absent is not None:
        assert not (work / absent).exists()
    assert not list(work.rglob("*.tmp-*")) and not list(work.rglob(".tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("argv,message", [
    (["train", "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["generate", "--checkpoint", "/nonexistent/run"], "does not exist"),
])
def test_real_process_prints_one_line_and_exits_2(tmp_path: Path, argv: list[str],
                                                  message: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "subllm", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("drop", [False, True])
def test_the_cli_drops_dynamos_exit_report(tmp_path, drop: bool) -> None:
    """torch._dynamo's exit handler imports `tabulate` at interpreter exit, which deadlocked a
    finished torchrun rank once; the CLI unregisters it (it only logs at INFO level)."""
    import subprocess
    import sys

    marker = tmp_path / "ran"
    code = (f"import torch._dynamo.utils as u\n"
            f"u.compile_times = lambda **kw: open({str(marker)!r}, 'w').write('x')\n"
            f"from subllm import cli\n" + ("cli._drop_dynamo_exit_report()\n" if drop else ""))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert marker.exists() != drop
