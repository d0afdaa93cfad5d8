"""--packing documents (the default) and none in training, eval and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from subllm.cli import main
from subllm.train.evaluate import evaluate_checkpoint


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory, prepare_corpus, tiny_settings) -> Path:
    """Documents of ~30 tokens, so that every 64-token row packs several."""
    root = tmp_path_factory.mktemp("packing")
    prepare_corpus(root, 60, lines=2)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(root / "data")))
    return root


def train(root: Path, out: str, *flags: str) -> list[float]:
    assert main(["train", "--config", str(root / "tiny.yaml"), "--out", str(root / out),
                 "--max-steps", "4", *flags]) == 0
    rows = (root / out / "metrics.jsonl").read_text().splitlines()
    return [r["train_loss"] for r in map(json.loads, rows) if "train_loss" in r]


def test_documents_is_the_default_and_changes_what_trains(short_docs: Path, capsys) -> None:
    packed = train(short_docs, "packed")
    assert "packed from documents" in capsys.readouterr().err
    plain = train(short_docs, "plain", "--packing", "none")
    assert yaml.safe_load((short_docs / "packed" / "config.yaml").read_text())[
        "packing"] == "documents"
    assert packed[0] != plain[0]  # the same batches, seen through document boundaries
    assert evaluate_checkpoint(short_docs / "packed", batches=2)["packing"] == "documents"
    assert evaluate_checkpoint(short_docs / "plain", batches=2)["packing"] == "none"


def test_a_run_from_before_packing_resumes_as_it_trained(short_docs: Path) -> None:
    straight = train(short_docs, "straight", "--packing", "none")
    run = short_docs / "old"
    train(short_docs, "old", "--packing", "none", "--stop-at", "2")
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["packing"]  # as a run of an earlier subllm saved it
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--out", str(run), "--resume"]) == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [r["train_loss"] for r in map(json.loads, rows) if "train_loss" in r] == straight


def test_a_bad_packing_value_is_one_line(short_docs: Path, capsys) -> None:
    settings = yaml.safe_load((short_docs / "tiny.yaml").read_text())
    (short_docs / "bad.yaml").write_text(yaml.safe_dump({**settings, "packing": "docs"}))
    assert main(["train", "--config", str(short_docs / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`packing` must be one of documents, none" in err


def test_a_mixture_resumes_exactly_mid_epoch(tmp_path: Path, write_corpus, tiny_settings) -> None:
    """Two sources mixed 0.7 / 0.3 (the mixture is train.bin itself): stopped mid-epoch and
    resumed, the run gives the losses of one that never stopped, packed by document."""
    write_corpus(tmp_path / "a", 12, seed=1, lines=3)
    write_corpus(tmp_path / "b", 12, seed=2, lines=3, words=["x", "y", "z", "w"])
    data = tmp_path / "data"
    assert main(["prepare", "--input", f"{tmp_path / 'a'}:0.7", "--input",
                 f"{tmp_path / 'b'}:0.3", "--out", str(data), "--vocab-size", "300"]) == 0
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(data)))
    straight = train(tmp_path, "straight", "--max-steps", "8")
    assert json.loads((data / "meta.json").read_text())["tokens"]["train"] < 8 * 4 * 64
    run = tmp_path / "stopped"  # several epochs in 8 steps: step 3 lies inside one
    train(tmp_path, "stopped", "--max-steps", "8", "--stop-at", "3")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [r["train_loss"] for r in map(json.loads, rows) if "train_loss" in r] == straight
