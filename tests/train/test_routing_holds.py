"""The model that serves keeps what the model that trained kept (docs/design.md §3.8): the
eval-mode kept fraction on held-out text, through `subllm train`, on a small real-text
corpus (a few standard-library packages), with the paper's rule (score > 0) as the control
that drifts."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import yaml

from subllm.cli import main

SETUPS = {
    # a one-depth toy like the routing issue's (keep 0.6), and a nested one at both depths
    "flat": ({"n_layers": 4, "structure": "T(TT)T", "keep": 0.6}, 128),
    "nested": ({"n_layers": 6, "structure": "T(T(TT)T)T", "keep": 0.64}, 256),
}
PACKAGES = ("json", "email", "http", "logging", "concurrent", "importlib", "xml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("routing")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in PACKAGES:
        shutil.copytree(stdlib / name, root / "corpus" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["prepare", "--input", str(root / "corpus"), "--out", str(root / "data"),
                 "--vocab-size", "512"]) == 0
    return root / "data"


def worst_off(data: Path, tmp: Path, tiny_settings, setup: str, **model) -> dict[int, float]:
    """{validation step: the largest |eval kept fraction - keep| over the modules}"""
    shape, seq_len = SETUPS[setup]
    settings = tiny_settings(data, model={**shape, **model, "max_seq_len": seq_len},
                             **{"seq-len": seq_len, "max-steps": 60, "eval-every": 20,
                                "eval-batches": 8, "warmup": 10, "log-every": 20})
    tmp.mkdir()
    (tmp / "settings.yaml").write_text(yaml.safe_dump(settings))
    assert main(["train", "--config", str(tmp / "settings.yaml"), "--out", str(tmp / "run")]) == 0
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    kept = {r["step"]: r["val_kept_fractions"] for r in rows if "val_kept_fractions" in r}
    assert sorted(kept) == [20, 40, 60]
    assert {len(k) for k in kept.values()} == {shape["structure"].count("(")}
    return {step: max(abs(f - shape["keep"]) for f in fr) for step, fr in kept.items()}


@pytest.mark.slow
def test_the_eval_kept_fraction_holds_and_the_papers_rule_drifts(data: Path, tmp_path: Path,
                                                                 tiny_settings) -> None:
    ranked = worst_off(data, tmp_path / "rank", tiny_settings, "flat")
    zero = worst_off(data, tmp_path / "zero", tiny_settings, "flat", threshold="zero")
    assert all(off <= 0.03 for step, off in ranked.items() if step >= 40), ranked
    assert max(zero.values()) > 0.1, zero  # the control


@pytest.mark.slow
def test_a_nested_model_keeps_closer_to_keep_at_both_depths_than_the_papers_rule(
        data: Path, tmp_path: Path, tiny_settings) -> None:
    """Both depths; the inner level's short-row bias (design.md §3.8) keeps this one from
    the 0.03 of the flat case after so little training (0.035 at step 60 here)."""
    ranked = worst_off(data, tmp_path / "rank", tiny_settings, "nested")
    zero = worst_off(data, tmp_path / "zero", tiny_settings, "nested", threshold="zero")
    late = [off for step, off in ranked.items() if step >= 40]
    assert max(late) <= 0.05, ranked
    assert max(zero.values()) > 3 * max(late), (ranked, zero)
