"""`subllm bench quality`: two tiny models trained alike on a tiny corpus, end to end through
the CLI; the same batches for both (a model against itself gives identical curves, equal to
an uninterrupted `subllm train`); bad input is one line and exit 2."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from subllm.bench.quality import eval_steps, loss_at_time
from subllm.cli import main
from subllm.train import TrainConfig, read_metrics, train

LLAMA = {"dim": 32, "n_heads": 2, "ffn_dim": 64, "n_layers": 4, "max_seq_len": 64}
SUBLLM = {**LLAMA, "structure": "T(TT)T", "keep": 0.64}
# 10 steps of 4 x 32 tokens, validated after steps 3, 7 and 10
FLAGS = ["--tokens", "1300", "--seq-len", "32", "--batch-size", "4",
         "--eval-batches", "2", "--lr", "3e-3", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, prepare_corpus) -> Path:
    """A small prepared corpus and the two model config files."""
    root = tmp_path_factory.mktemp("quality")
    prepare_corpus(root, 30)  # 30 docs of 30 lines of 12 words, seed 0, vocab 300
    (root / "llama.yaml").write_text(yaml.safe_dump(LLAMA))
    (root / "subllm.yaml").write_text(yaml.safe_dump(SUBLLM))
    return root


def bench(work: Path, out: Path | None, pair: str, *flags: str) -> int:
    """`subllm bench quality` on the corpus of `work`, into `out` (None: no --out)."""
    return main(["bench", "quality", "--pair", pair, "--data", str(work / "data"),
                 *(["--out", str(out)] if out is not None else []), *FLAGS, "--evals", "3",
                 *flags])


@pytest.fixture(scope="module")
def llama_vs_subllm(work: Path, bench_cwd) -> Path:
    """Run without --out from a folder of its own: the outputs are in ./bench-out/quality,
    and the checkout is untouched (bench_cwd)."""
    with bench_cwd(work / "cwd") as cwd:
        assert bench(work, None, f"{work / 'llama.yaml'},{work / 'subllm.yaml'}") == 0
    assert [p.name for p in cwd.iterdir()] == ["bench-out"]
    return cwd / "bench-out" / "quality"


def test_end_to_end_writes_both_curves_at_the_same_tokens(llama_vs_subllm: Path) -> None:
    out = llama_vs_subllm
    assert {p.name for p in out.iterdir()} == {"quality.json", "quality.md",
                                               "quality_curves.png", "runs"}
    assert (out / "quality_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads((out / "quality.json").read_text())
    assert r["bench"] == "quality" and r["machine"]["threads"] == 1 and r["command"]
    assert r["a"]["structure"] == "TTTT" and r["b"]["structure"] == "T(TT)T"
    assert r["a"]["keep"] == [] and r["b"]["keep"] == [0.64]
    s = r["settings"]
    assert (s["steps"], s["tokens"], s["tokens_per_step"]) == (10, 1280, 128)
    assert s["eval_steps"] == [3, 7, 10] and s["vocab_size"] == 300
    assert s["warmup"] == 1 and s["min_lr"] == pytest.approx(3e-4)

    a, b = r["curves"]["a"], r["curves"]["b"]
    assert [p["tokens"] for p in a] == [p["tokens"] for p in b] == [384, 896, 1280]
    for key, curve in (("a", a), ("b", b)):
        run = out / "runs" / key.upper()
        records = read_metrics(run / "metrics.jsonl")
        steps = [rec for rec in records if "train_loss" in rec]
        assert [rec["step"] for rec in steps] == list(range(1, 11))  # every step logged once
        val = {rec["step"]: rec["val_loss"] for rec in records if "val_loss" in rec}
        assert val == {p["step"]: p["val_loss"] for p in curve}
        # training time = the loop's own step times, summed up to each validation point
        for p in curve:
            expected = sum(128 / rec["tokens_per_s"] for rec in steps if rec["step"] <= p["step"])
            assert p["train_s"] == pytest.approx(expected)
            assert p["wall_s"] > p["train_s"] > 0  # wall adds evaluation and checkpoints
        assert [p["train_s"] for p in curve] == sorted(p["train_s"] for p in curve)
        final = r["final"][key]
        assert final["val_loss"] == curve[-1]["val_loss"] < curve[0]["val_loss"]
        assert final["tokens_per_s"] == pytest.approx(1280 / final["train_s"])
        assert final["median_step_s"] == pytest.approx(statistics.median(
            128 / rec["tokens_per_s"] for rec in steps))
    assert r["final"]["a"]["eval_kept_fractions"] == []
    kept = r["final"]["b"]["eval_kept_fractions"]
    assert len(kept) == 1 and 0.0 <= kept[0] <= 1.0 and kept == b[-1]["val_kept_fractions"]

    q = r["ratios"]
    fa, fb = r["final"]["a"], r["final"]["b"]
    assert q["val_loss"] == pytest.approx(fb["val_loss"] / fa["val_loss"])
    assert q["train_time"] == pytest.approx(fb["train_s"] / fa["train_s"])
    assert q["val_loss_per_point"] == pytest.approx([pb["val_loss"] / pa["val_loss"]
                                                     for pa, pb in zip(a, b, strict=True)])
    assert r["target"]["met"] == (q["val_loss"] <= 1.02 and q["train_time"] < 1.0)
    table = (out / "quality.md").read_text()
    assert "| 1,280 |" in table and "| 384 |" in table and "Target" in table


def test_same_seed_gives_both_models_the_same_batches(work: Path) -> None:
    """LLaMA against itself: identical curves, step for step, and equal to one
    uninterrupted `subllm train` run with the same settings (the interleaving is exact)."""
    out = work / "out-same"
    llama = str(work / "llama.yaml")
    assert bench(work, out, f"{llama},{llama}") == 0
    r = json.loads((out / "quality.json").read_text())
    a, b = r["curves"]["a"], r["curves"]["b"]
    assert [p["val_loss"] for p in a] == [p["val_loss"] for p in b]
    assert r["ratios"]["val_loss"] == 1.0

    def train_losses(run: Path) -> list[float]:
        return [rec["train_loss"] for rec in read_metrics(run / "metrics.jsonl")
                if "train_loss" in rec]

    assert train_losses(out / "runs" / "A") == train_losses(out / "runs" / "B")
    saved = yaml.safe_load((out / "runs" / "A" / "config.yaml").read_text())
    saved.pop("model_config")
    saved.pop("data_tokenizer_sha256")
    straight = work / "straight"
    result = train(TrainConfig(**{**saved, "out": str(straight)}))
    assert result["loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-6)
    assert train_losses(straight) == pytest.approx(train_losses(out / "runs" / "A"), rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--pair", "llama-tiny,llama-tinyy"], "unknown preset 'llama-tinyy'"),
    (["--pair", "llama-tiny"], "two models separated by a comma"),
    (["--data", "{work}/nowhere"], "does not exist"),
    (["--tokens", "100"], "less than one step (128 tokens"),
    (["--evals", "2", "--eval-every-tokens", "64"], "not allowed with argument"),
    (["--eval-every-tokens", "64"], "--eval-every-tokens 64 is less than one step"),
    (["--min-lr", "1e-2"], "--min-lr 0.01 is above --lr"),
    (["--seq-len", "100000", "--tokens", "1000000"], "fewer than one sequence of --seq-len 100000"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["--tokens", "0"], "must be a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(work: Path, tmp_path: Path, capsys, flags, message
                                          ) -> None:
    out = tmp_path / "out"
    pair = f"{work / 'llama.yaml'},{work / 'subllm.yaml'}"
    argv = ["bench", "quality", "--pair", pair, "--data", str(work / "data"), *FLAGS,
            "--out", str(out), *[f.format(work=work) for f in flags]]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (out / "runs").exists() and not (out / "quality.json").exists()


def test_an_out_folder_with_runs_is_refused(work: Path, llama_vs_subllm: Path, capsys) -> None:
    before = (llama_vs_subllm / "quality.json").read_bytes()
    assert bench(work, llama_vs_subllm, f"{work / 'llama.yaml'},{work / 'subllm.yaml'}") == 2
    err = capsys.readouterr().err.strip()
    assert "already holds a run" in err and len(err.splitlines()) == 1
    assert (llama_vs_subllm / "quality.json").read_bytes() == before


def test_eval_points_and_equal_time_interpolation() -> None:
    assert eval_steps(10, 128, None, None) == list(range(1, 11))
    assert eval_steps(10, 128, 3, None) == [3, 7, 10]
    assert eval_steps(10, 128, 40, None) == list(range(1, 11))
    assert eval_steps(10, 128, None, 3 * 128 + 5) == [3, 6, 9, 10]
    curve = [{"train_s": 1.0, "val_loss": 4.0}, {"train_s": 3.0, "val_loss": 3.0}]
    assert loss_at_time(curve, 2.0) == pytest.approx(3.5)
    assert loss_at_time(curve, 3.0) == pytest.approx(3.0)
    assert loss_at_time(curve, 0.5) is None and loss_at_time(curve, 3.5) is None


def test_seeds_repeat_the_comparison_and_summarise_mean_and_spread(work: Path) -> None:
    out = work / "out-seeds"
    assert bench(work, out, f"{work / 'llama.yaml'},{work / 'subllm.yaml'}", "--seeds", "2",
                 "--seed", "4") == 0
    assert {p.name for p in out.iterdir()} == {"seed-4", "seed-5", "quality_seeds.json",
                                               "quality_seeds.md", "quality_seeds.png"}
    r = json.loads((out / "quality_seeds.json").read_text())
    singles = [json.loads((out / f"seed-{s}" / "quality.json").read_text()) for s in (4, 5)]
    assert [x["settings"]["seed"] for x in singles] == [4, 5]
    ratios = [x["ratios"]["val_loss"] for x in singles]
    assert singles[0]["final"]["a"]["val_loss"] != singles[1]["final"]["a"]["val_loss"]
    stats = r["stats"]["val_loss_ratio"]
    assert stats["mean"] == pytest.approx(sum(ratios) / 2)
    assert stats["std"] == pytest.approx(abs(ratios[0] - ratios[1]) / 2 ** 0.5)
    assert (stats["min"], stats["max"]) == (min(ratios), max(ratios))
    assert "| 5 |" in (out / "quality_seeds.md").read_text()


def test_seeds_reuse_a_seed_measured_apart_with_the_same_settings_only(work: Path, capsys
                                                                        ) -> None:
    """A seed run on its own (in parallel, or by a study that was stopped) is picked up by
    `--seeds N` as it is; one measured with other settings is refused, nothing written."""
    pair = f"{work / 'llama.yaml'},{work / 'subllm.yaml'}"
    out = work / "out-reuse"
    assert bench(work, out / "seed-6", pair, "--seed", "6") == 0
    before = (out / "seed-6" / "quality.json").read_bytes()
    metrics = (out / "seed-6" / "runs" / "B" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert bench(work, out, pair, "--seeds", "2", "--seed", "6") == 0
    assert "seed 6 already measured" in capsys.readouterr().out
    assert (out / "seed-6" / "quality.json").read_bytes() == before  # not run again
    assert (out / "seed-6" / "runs" / "B" / "metrics.jsonl").read_bytes() == metrics
    r = json.loads((out / "quality_seeds.json").read_text())
    assert [row["seed"] for row in r["seeds"]] == [6, 7]
    assert r["seeds"][0]["val_loss_ratio"] == json.loads(before)["ratios"]["val_loss"]

    other = work / "out-other"
    assert bench(work, other / "seed-6", pair, "--seed", "6", "--lr", "1e-3") == 0
    capsys.readouterr()
    assert bench(work, other, pair, "--seeds", "2", "--seed", "6") == 2
    err = capsys.readouterr().err.strip()
    assert "other settings (lr 0.001, asked 0.003)" in err and len(err.splitlines()) == 1, err
    assert not (other / "seed-7").exists() and not (other / "quality_seeds.json").exists()
