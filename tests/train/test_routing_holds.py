"""The model that serves keeps what the model that trained kept (docs/design.md §3.8): the
eval-mode kept fraction on validation text, through `subllm train`, on two small setups,
with the paper's rule (score > 0) as the control that drifts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from subllm.cli import main

SETUPS = {
    # a one-depth toy like the routing issue's (keep 0.6), and a nested one at both depths
    "flat": ({"n_layers": 4, "structure": "T(TT)T", "keep": 0.6}, 128),
    "nested": ({"n_layers": 6, "structure": "T(T(TT)T)T", "keep": 0.64}, 256),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory, prepare_corpus) -> Path:
    return prepare_corpus(tmp_path_factory.mktemp("routing"), 60)


def eval_kept(data: Path, tmp: Path, tiny_settings, setup: str, **model) -> dict[int, list]:
    shape, seq_len = SETUPS[setup]
    settings = tiny_settings(data, model={**shape, **model, "max_seq_len": seq_len},
                             **{"seq-len": seq_len, "max-steps": 60, "eval-every": 20,
                                "eval-batches": 8, "warmup": 10, "log-every": 20})
    tmp.mkdir()
    (tmp / "settings.yaml").write_text(yaml.safe_dump(settings))
    assert main(["train", "--config", str(tmp / "settings.yaml"), "--out", str(tmp / "run")]) == 0
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_kept_fractions"] for r in rows if "val_kept_fractions" in r}


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_the_eval_kept_fraction_holds_at_every_depth_and_the_papers_rule_drifts(
        setup: str, data: Path, tmp_path: Path, tiny_settings) -> None:
    keep = SETUPS[setup][0]["keep"]
    ranked = eval_kept(data, tmp_path / "rank", tiny_settings, setup)
    zero = eval_kept(data, tmp_path / "zero", tiny_settings, setup, threshold="zero")
    assert sorted(ranked) == sorted(zero) == [20, 40, 60]
    depths = len(ranked[60])
    assert depths == (2 if setup == "nested" else 1)
    off = {step: max(abs(f - keep) for f in fractions) for step, fractions in ranked.items()}
    assert all(d <= 0.03 for step, d in off.items() if step >= 40), ranked
    # the control: the same training, score > 0 at inference
    assert max(max(abs(f - keep) for f in fr) for fr in zero.values()) > 0.03, zero
