import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from subllm.cli import main
from subllm.model.subsample import CUTOFF_BUFFERS


def info_json(capsys, *args: str) -> dict:
    assert main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_reports_paper_parameter_counts(capsys):
    llama = info_json(capsys, "llama-1.3b")
    sub = info_json(capsys, "subllm-1.3b")
    assert abs(llama["parameters"] - 1.345e9) < 1e6
    assert sub["parameters"] == llama["parameters"] + 2 * 2048 + 2 * 2048
    assert abs(sub["block_compute_fraction"] - (10 + 10 * 0.64 + 4 * 0.64**2) / 24) < 1e-12
    assert [s["keep"] for s in sub["segments"]] == [0.64, 0.64]
    assert llama["segments"] == [] and llama["block_compute_fraction"] == 1.0
    assert sub["training_flops_per_token"] < llama["training_flops_per_token"]


def test_info_text_output(capsys):
    assert main(["info", "subllm-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "1,345,431,552" in out and "block compute 0.752" in out
    assert "TTTTT(TTTTT(TTTT)TTTTT)TTTTT" in out


def test_info_bad_input_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('preset: subllm-tiny\nstructure: "TTT(TT(TT)TT)TT("\n')
    for args, fragment in ((["nope"], "unknown preset 'nope'"),
                           ([str(bad)], "position 15 is never closed"),
                           ([str(tmp_path / "missing.yaml")], "does not exist")):
        assert main(["info", *args]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_info_of_a_file_that_is_no_config_says_so_in_one_plain_line(capsys, tmp_path,
                                                                   monkeypatch):
    """A JSON-lines corpus, plain text or binary data: what the file is not and what `info`
    takes, no parser internals; an empty or missing path argument is named as such."""
    monkeypatch.chdir(tmp_path)
    Path("corpus.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    Path("notes.txt").write_text("a note: with a colon\n - and: [\n")
    Path("train.bin").write_bytes(bytes(range(256)))
    Path("broken.yaml").write_text("lr: [1, 2\n")
    accepted = "pass a preset (llama-tiny, subllm-tiny"
    for arg, fragment in (("corpus.jsonl", "corpus.jsonl is not a model config or `subllm "
                           "train` settings; " + accepted),
                          ("notes.txt", "notes.txt is not a model config"),
                          ("train.bin", "train.bin is not a model config"),
                          ("", "PRESET_OR_CONFIG is empty; " + accepted),
                          ("no/such/path", "no/such/path does not exist; " + accepted),
                          ("gone.jsonl", "gone.jsonl does not exist; " + accepted),
                          ("broken.yaml", "broken.yaml is not valid YAML at line 2, column 1")):
        assert main(["info", arg]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], err
        for internal in ("<document start>", "found '{'", "mapping values", "unknown preset",
                         " . ", "Traceback"):
            assert internal not in err, err
    assert main(["info", "subllm-1.3"]) == 2  # a preset name with a typo stays one
    assert "did you mean 'subllm-1.3b'?" in capsys.readouterr().err


# ---- what `subllm train` would build: settings files, runs, exported directories ----------


SRC = Path(__file__).resolve().parents[1] / "src"
SETTINGS = {"preset": "subllm-tiny", "seq-len": 32, "batch-size": 2, "max-steps": 1,
            "warmup": 1, "eval-batches": 1, "eval-every": 0, "save-every": 0,
            "device": "cpu", "model": {"dim": 32, "n_heads": 2, "ffn_dim": 64,
                                       "max_seq_len": 64}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepare_corpus) -> tuple[Path, Path, Path]:
    """(a `subllm train` settings file, its run, the run exported)."""
    root = tmp_path_factory.mktemp("info-run")
    data = prepare_corpus(root, 12)
    settings = root / "train.yaml"
    settings.write_text(yaml.safe_dump({**SETTINGS, "data": str(data)}))
    assert main(["train", "--config", str(settings), "--out", str(root / "run")]) == 0
    assert main(["export", "--checkpoint", str(root / "run"), "--out", str(root / "hf")]) == 0
    return settings, root / "run", root / "hf"


def test_info_means_what_training_built(trained, capsys):
    """A settings file with a top-level preset and a `model:` section, the run's own
    config.yaml, the run and its export all describe the model that trained (not the
    1.3B default the `model:` section alone would give)."""
    settings, run, hf = trained
    from subllm.train import checkpoint as ckpt

    state = ckpt.load_weights(ckpt.resolve_checkpoint(run))
    buffers = ("balancer.g_rms", *(f"subsamplers.{j}.{b}" for j in range(2)
                                    for b in CUTOFF_BUFFERS))
    real = sum(t.numel() for k, t in state.items()  # tied head once, buffers not counted
               if k != "lm_head.weight" and not k.endswith(buffers))
    described = [info_json(capsys, str(p)) for p in (settings, run / "config.yaml", run, hf)]
    assert [d["parameters"] for d in described] == [real] * 4
    assert {d["structure"] for d in described} == {"TTT(TT(TT)TT)TTT"}
    assert described[0]["config"] == described[2]["config"] == described[3]["config"]
    assert main(["estimate", "--config", str(run), "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["parameters"] == real


@pytest.mark.slow
def test_info_errors_through_the_real_cli(trained, tmp_path):
    settings, run, _ = trained
    no_data = tmp_path / "no-data.yaml"
    no_data.write_text(yaml.safe_dump({**SETTINGS, "data": str(tmp_path / "nowhere")}))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("preset: subllm-tiny\n# caf\xe9\n".encode("latin-1"))
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("preset: subllm-tiny\nseq-len: 32\ndim: 64\n")
    before = {p: p.read_bytes() for p in (settings, no_data, latin, mixed)}
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for path, fragment in ((no_data, "takes its vocabulary from the data"),
                           (latin, "is not UTF-8 text"),
                           (mixed, "neither a model config nor `subllm train` settings")):
        r = subprocess.run([sys.executable, "-m", "subllm", "info", str(path)],
                           capture_output=True, text=True, timeout=120, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert fragment in lines[0], lines[0]
    assert {p: p.read_bytes() for p in before} == before
