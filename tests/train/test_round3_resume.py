"""Issue 28 (round 3): every run can be resumed, and runs and exports written by older
versions of subllm keep working.

A router warm-up (--train-only-routers) resumes exactly, also sharded; a resume that would
train nothing says so and changes nothing; --resume without a checkpoint prepares nothing;
--async-checkpoint without FSDP is refused. tests/fixtures/old holds runs and exports made
by older commits (its README says which and how): they resume with the settings they were
trained with and reproduce, step for step, that version's own uninterrupted run; their
exports start new runs where they left off; eval and generate read both."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from procs import cli, one_line, run_bounded, snapshot
from safetensors.torch import load_file

from subllm.cli import build_parser, main
from subllm.errors import SubLLMError
from subllm.train import checkpoint as ckpt
from subllm.train.config import check_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "old"
# commit -> (threshold, rank_band) its model was trained and decided with
OLD = {"3d41f36": ("zero", None), "c9dc9fa": ("rank", None)}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, prepare_corpus, tiny_settings) -> Path:
    root = tmp_path_factory.mktemp("round3-resume")
    prepare_corpus(root, 40, lines=40)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(root / "data")))
    return root


def train(work: Path, out: Path, *flags: str) -> int:
    return main(["train", "--config", str(work / "tiny.yaml"), "--out", str(out), *flags])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def losses(path: Path) -> dict[int, float]:
    """{step: train loss} of a run directory or a metrics.jsonl file."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    return {r["step"]: r["train_loss"] for r in records(path) if "train_loss" in r}


def val_losses(path: Path) -> dict[int, float]:
    path = path / "metrics.jsonl" if path.is_dir() else path
    return {r["step"]: r["val_loss"] for r in records(path) if "val_loss" in r}


def same_weights(a: Path, b: Path) -> bool:
    x = load_file(str(ckpt.latest_checkpoint(a) / "model.safetensors"))
    y = load_file(str(ckpt.latest_checkpoint(b) / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --train-only-routers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def routers_straight(work: Path) -> Path:
    """8 steps in one go, the first 4 a router warm-up: the reference."""
    out = work / "routers-straight"
    assert train(work, out, "--max-steps", "8", "--train-only-routers", "4") == 0
    return out


@pytest.mark.slow
def test_a_router_warm_up_resumes_exactly(work: Path, routers_straight: Path) -> None:
    run = work / "routers-stopped"
    assert train(work, run, "--max-steps", "8", "--train-only-routers", "4",
                 "--stop-at", "2") == 0
    # saved in the warm-up: the frozen blocks have no optimizer state yet, the routers have
    optimizer = ckpt.load_train_state(ckpt.latest_checkpoint(run))["optimizer"]["state"]
    assert "embed_tokens.weight" not in optimizer and "subsamplers.0.score.weight" in optimizer
    # with the flag given again, past the warm-up's end; then with the run's own settings
    assert main(["train", "--out", str(run), "--resume", "--train-only-routers", "4",
                 "--stop-at", "5"]) == 0
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert losses(run) == losses(routers_straight)  # bit-identical, every step
    assert same_weights(run, routers_straight)


@pytest.mark.slow
def test_a_sharded_router_warm_up_resumes(work: Path, routers_straight: Path) -> None:
    """FSDP on two processes: the shards of a checkpoint saved in the warm-up hold no
    optimizer state for the blocks; resuming reads what is there."""
    run = work / "routers-fsdp"
    common = ("--config", str(work / "tiny.yaml"), "--out", str(run), "--max-steps", "8",
              "--batch-size", "2", "--distributed", "fsdp", "--train-only-routers", "4")
    for flags in (("--stop-at", "2"), ("--resume",)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "subllm", "train", *common, *flags]
        proc = run_bounded(cmd, _env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr
    a, b = losses(routers_straight), losses(run)
    assert a.keys() == b.keys() and max(abs(a[s] - b[s]) for s in a) < 1e-4


def _env() -> dict[str, str]:
    import os

    from procs import SRC

    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


# a resume that would train nothing ---------------------------------------------------------
@pytest.mark.slow
def test_a_resume_that_trains_nothing_changes_nothing(work: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(work, run, "--max-steps", "6", "--save-every", "2", "--stop-at", "4") == 0
    before = snapshot(run)
    for flag in ("--max-steps", "--stop-at"):  # before the checkpoint's step: refused
        one_line(cli("train", "--out", str(run), "--resume", flag, "3"), 2,
                 f"{flag} 3 is below step 4", "step-00000004", "the run is past it")
        assert snapshot(run) == before
    for flag in ("--max-steps", "--stop-at"):  # at it: said, exit 0
        r = cli("train", "--out", str(run), "--resume", flag, "4")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines == [f"{run} is already at step 4 ({flag} 4): nothing to train; pass "
                         + ("--max-steps above 4" if flag == "--max-steps" else
                            "a later --stop-at, or none,") + " to train on"], lines
        assert snapshot(run) == before
    # the run's settings were not rewritten: a plain --resume trains on to its own 6 steps
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert max(losses(run)) == 6


@pytest.mark.slow
def test_the_demo_run_again_when_finished_says_so_and_changes_nothing(
        work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """`subllm train` with no arguments resumes runs/default with the demo's settings; a
    finished one (the demo's --max-steps made 1 here) is said to be done, with the next
    steps, before anything else (its data/default is not even read)."""
    from subllm.train.config import DEMO

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(DEMO, "max_steps", 1)
    shutil.copytree(work / "data", "data/default")
    assert train(work, Path("runs/default"), "--max-steps", "1", "--data", "data/default") == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["train"]) == 0  # the demo: resumes runs/default, here at its last step
    out, err = capsys.readouterr()
    assert err == ("runs/default is already at step 1 (--max-steps 1): nothing to train; pass "
                   "--max-steps above 1 to train on\n")
    assert out.startswith("next:\n") and "subllm generate --checkpoint runs/default" in out
    assert snapshot(tmp_path) == before  # no data/default prepared, the run as it was


@pytest.mark.slow
def test_resume_without_a_checkpoint_prepares_no_corpus(work: Path, tmp_path: Path) -> None:
    """On the built-in corpus (no --data) a refusal that needs no data comes before the
    corpus is prepared (half a minute, data/default), and leaves nothing behind."""
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(cli("train", "--resume", cwd=empty, timeout=60), 2,
             "runs/default has no complete checkpoint", "drop --resume")
    one_line(cli("train", "--out", "runs/a/b", "--resume", cwd=empty, timeout=60), 2,
             "runs/a/b has no complete checkpoint")
    assert list(empty.iterdir()) == []  # no data/default, no runs/ (nor runs/a)
    run = tmp_path / "run"
    assert train(work, run, "--max-steps", "2") == 0
    before = snapshot(run)
    one_line(cli("train", "--out", str(run), cwd=empty, timeout=60), 2,
             "already holds a run", "pass --resume")
    assert list(empty.iterdir()) == [] and snapshot(run) == before


# --async-checkpoint ------------------------------------------------------------------------
@pytest.mark.slow
def test_async_checkpoint_without_fsdp_is_refused(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "async"
    one_line(cli("train", "--config", str(work / "tiny.yaml"), "--out", str(out),
                 "--async-checkpoint"), 2,
             "--async-checkpoint goes with --distributed fsdp", "drop --async-checkpoint")
    assert not out.exists()


def _resolve(argv: list[str]):
    from subllm.commands.train import resolve

    argv = ["train", *argv]
    args = build_parser(argv).parse_args(argv)
    return resolve(args, args._parser)[0]


def test_an_hsdp_runs_own_settings_do_not_stop_a_resume_under_ddp(tmp_path: Path) -> None:
    """--replicate and --async-checkpoint saved by an HSDP run go only with FSDP: resumed
    under DDP (or one process), they are not carried over; typed, they are refused."""
    run = tmp_path / "hsdp"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"data": "d", "max_steps": 8, "distributed": "fsdp", "replicate": 2,
         "async_checkpoint": True}))
    cfg = _resolve(["--out", str(run), "--resume"])
    assert (cfg.distributed, cfg.replicate, cfg.async_checkpoint) == ("fsdp", 2, True)
    cfg = _resolve(["--out", str(run), "--resume", "--distributed", "ddp"])
    assert (cfg.distributed, cfg.replicate, cfg.async_checkpoint) == ("ddp", 1, False)
    check_config(cfg)
    cfg = _resolve(["--out", str(run), "--resume", "--distributed", "ddp", "--async-checkpoint"])
    with pytest.raises(SubLLMError, match="--async-checkpoint goes with --distributed fsdp"):
        check_config(cfg)


# runs and exports of older versions ---------------------------------------------------------
@pytest.fixture(scope="module")
def fixtures_before() -> dict[str, str]:
    return snapshot(FIXTURES)


def _check_fixtures_unchanged(before: dict[str, str]) -> None:
    assert snapshot(FIXTURES) == before  # read in place, never written


@pytest.mark.parametrize("commit", OLD)
def test_an_old_run_resumes_with_the_settings_it_was_trained_with(
        commit: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        fixtures_before: dict[str, str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / commit / "run", run)
    data = FIXTURES / "data"
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--data", str(data), "--resume"]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    threshold, band = OLD[commit]
    assert len(warnings) == 1 and "saved by an older subllm" in warnings[0], warnings
    assert "rank_band None (new runs: 0.02)" in warnings[0]
    assert ("threshold 'zero'" in warnings[0]) == (threshold == "zero")
    # that version's own run, never stopped: the same losses, step for step
    straight = FIXTURES / commit / "straight.jsonl"
    got, want = losses(run), losses(straight)
    assert got.keys() == want.keys() == set(range(1, 9))
    assert max(abs(got[s] - want[s]) for s in want) < 1e-5
    assert abs(val_losses(run)[8] - val_losses(straight)[8]) < 1e-5
    saved = ckpt.load_model_config(ckpt.latest_checkpoint(run))
    assert (saved["threshold"], saved["rank_band"]) == (threshold, band)
    # from now on its own config.yaml builds that model: no warning, it trains on
    assert main(["train", "--out", str(run), "--data", str(data), "--resume",
                 "--max-steps", "10"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert max(losses(run)) == 10
    # a change of model setting is still refused, naming it
    assert main(["train", "--out", str(run), "--data", str(data), "--resume",
                 "--max-steps", "12", "--keep", "0.5"]) == 2
    assert "model settings differ from the checkpoint's (keep)" in capsys.readouterr().err
    _check_fixtures_unchanged(fixtures_before)


@pytest.mark.parametrize("source", ["hf", "run"])  # its export, or the run itself
@pytest.mark.parametrize("commit", OLD)
def test_an_old_export_starts_a_new_run_where_it_left_off(
        commit: str, source: str, tmp_path: Path, fixtures_before: dict[str, str]) -> None:
    out = tmp_path / "init"
    assert main(["train", "--data", str(FIXTURES / "data"), "--out", str(out), "--init-from",
                 str(FIXTURES / commit / source), "--max-steps", "3", "--seq-len", "32",
                 "--batch-size", "4", "--warmup", "0", "--log-every", "1", "--eval-batches",
                 "2", "--device", "cpu"]) == 0
    saved = ckpt.load_model_config(ckpt.latest_checkpoint(out))
    assert (saved["threshold"], saved["rank_band"]) == OLD[commit]
    # its first loss (the exported weights, before any update) is where the old run was at
    # its step 5 (the same weights on another batch), not where a fresh model starts
    old = losses(FIXTURES / commit / "straight.jsonl")
    first = losses(out)[1]
    assert abs(first - old[5]) < 0.03 and old[1] - first > 0.08, (first, old)
    _check_fixtures_unchanged(fixtures_before)


@pytest.mark.parametrize("commit", OLD)
def test_eval_and_generate_read_old_runs_and_exports(
        commit: str, capsys: pytest.CaptureFixture, fixtures_before: dict[str, str]) -> None:
    # the validation loss that version measured at the run's step 4, on the same batches
    want = val_losses(FIXTURES / commit / "run")[4]
    for path in (FIXTURES / commit / "run", FIXTURES / commit / "hf"):
        assert main(["eval", "--checkpoint", str(path), "--data", str(FIXTURES / "data"),
                     "--json", "--device", "cpu", "--batches", "2", "--seq-len", "32",
                     "--batch-size", "4"]) == 0
        assert abs(json.loads(capsys.readouterr().out)["val_loss"] - want) < 1e-5, path
        assert main(["generate", "--checkpoint", str(path), "--prompt", "the model",
                     "--max-new-tokens", "4", "--device", "cpu"]) == 0
        assert capsys.readouterr().out.startswith("the model")
    _check_fixtures_unchanged(fixtures_before)


@pytest.mark.parametrize("source", ["hf", "run"])
def test_an_old_models_retired_settings_are_one_line_of_warning(
        source: str, tmp_path: Path, fixtures_before: dict[str, str]) -> None:
    """c9dc9fa saved the quota controller's and the leaky clamp's settings, retired since:
    eval reads the model all the same, and says so in one line, once."""
    r = cli("eval", "--checkpoint", str(FIXTURES / "c9dc9fa" / source), "--data",
            str(FIXTURES / "data"), "--json", "--device", "cpu", "--batches", "1",
            "--seq-len", "32", "--batch-size", "2", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    said = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert said == ["subllm eval: warning: ignoring rank_quota_rate, rank_quota_every, "
                    "weight_leak: settings of an older subllm for the quota controller and "
                    "the leaky clamp, retired because they no longer paid for themselves "
                    "(docs/design.md §3.8)"], r.stderr
    assert json.loads(r.stdout)["val_loss"] > 0
    _check_fixtures_unchanged(fixtures_before)


def test_a_retired_setting_is_dropped_with_a_warning_and_a_new_one_is_still_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from subllm.errors import SubLLMWarning
    from subllm.model import ConfigError, ModelConfig, config

    monkeypatch.setattr(config, "_WARNED", set())  # said once per process: not yet here
    d = {**ModelConfig.preset("subllm-tiny").to_dict(), "rank_quota_rate": 0.3}
    with pytest.warns(SubLLMWarning, match="ignoring rank_quota_rate: settings of an older"):
        assert ModelConfig.from_dict(d) == ModelConfig.preset("subllm-tiny")
    with pytest.raises(ConfigError, match="unknown model config key 'rank_quota_rte'"):
        ModelConfig.from_dict({**ModelConfig.preset("subllm-tiny").to_dict(), "rank_quota_rte": 0})
