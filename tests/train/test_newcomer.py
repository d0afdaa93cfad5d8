"""What a new user meets in `subllm train / eval / generate / info`: a flag on top of the demo
changes only what it names, warnings and hints that say what to do next, one final
validation line, eval progress, help that states every default, the routing plot's band
and the busy-CPU tip."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from subllm.cli import VERBS, build_parser, main
from subllm.train.config import DEMO, TrainConfig

# ---------------------------------------------------------------------------------------------
# `subllm train` settings, with the training loop replaced (no torch work)


@pytest.fixture
def fake_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, bool, list]]:
    """Run `subllm train` in an empty directory with a stand-in for the loop; the list
    collects (settings, demo, the lines the loop is to say before training) of each call."""
    import subllm.train.loop as loop

    calls: list[tuple[Any, bool, list]] = []

    def train(cfg: TrainConfig, demo: bool = False, notes: Any = ()) -> dict[str, Any]:
        calls.append((cfg, demo, list(notes)))
        return {"interrupted": False}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "train", train)
    return calls


def _demo_values(cfg: TrainConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in DEMO if k not in skip}


def test_a_flag_on_top_of_the_demo_changes_only_that_setting(fake_train: list) -> None:
    assert main(["train", "--log-every", "5"]) == 0
    cfg, demo, notes = fake_train[-1]
    assert _demo_values(cfg, skip=("log_every",)) == {k: v for k, v in DEMO.items()
                                                     if k != "log_every"}
    assert cfg.log_every == 5 and cfg.max_steps == 300 and not demo
    assert notes == ["demo settings (no --data or --config) with --log-every 5: max-steps 300, "
                     "lr 0.002, min-lr 0.0002, warmup 30, eval-every 100, eval-batches 16, "
                     "save-every 100"]
    # the plain demo says nothing of the kind; --out keeps the demo's settings too
    assert main(["train"]) == 0
    cfg, demo, notes = fake_train[-1]
    assert demo and _demo_values(cfg) == DEMO and notes == []
    assert main(["train", "--out", "runs/x", "--max-steps", "50"]) == 0
    cfg, _, notes = fake_train[-1]
    assert cfg.out == "runs/x" and cfg.max_steps == 50 and cfg.lr == DEMO["lr"]
    assert notes[0].startswith("demo settings (no --data or --config) with --out runs/x "
                               "--max-steps 50: lr 0.002, min-lr 0.0002, warmup 30,")


def test_own_data_or_a_config_file_start_from_the_generic_defaults(
        fake_train: list, tmp_path: Path) -> None:
    generic = TrainConfig()
    assert main(["train", "--data", "data/mine", "--log-every", "5"]) == 0
    assert _demo_values(fake_train[-1][0], skip=("log_every",)) == _demo_values(
        generic, skip=("log_every",))
    (tmp_path / "s.yaml").write_text("log-every: 5\n")
    assert main(["train", "--config", "s.yaml"]) == 0
    assert fake_train[-1][0].max_steps == generic.max_steps
    assert all(notes == [] for _, _, notes in fake_train)


def test_resume_still_takes_the_runs_saved_settings(fake_train: list, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    saved = {**TrainConfig(max_steps=8, lr=0.01, warmup=2, eval_every=4).__dict__,
             "data": "data/mine"}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", "--out", str(run), "--resume"]) == 0
    cfg, _, notes = fake_train[-1]
    assert (cfg.max_steps, cfg.lr, cfg.warmup, cfg.eval_every, cfg.data) == (
        8, 0.01, 2, 4, "data/mine")
    assert cfg.resume and notes == []  # the run's own settings, not the demo's


@pytest.mark.parametrize("warmup, max_steps, says", [
    (20, 10, "the learning rate never reaches --lr 0.001 (it ends at 0.0005)"),
    (10, 10, "the learning rate reaches --lr 0.001 only at the last step"),
])
def test_a_warmup_as_long_as_the_run_is_warned(fake_train: list, warmup: int, max_steps: int,
                                               says: str) -> None:
    assert main(["train", "--data", "d", "--warmup", str(warmup), "--max-steps",
                 str(max_steps)]) == 0
    notes = fake_train[-1][2]
    assert len(notes) == 1 and notes[0].startswith(
        f"warning: --warmup {warmup} is not shorter than --max-steps {max_steps}: ")
    assert says in notes[0] and "lower --warmup (e.g. 1) or raise --max-steps" in notes[0]
    assert main(["train", "--data", "d", "--warmup", "9", "--max-steps", "10"]) == 0
    assert fake_train[-1][2] == []


def test_the_demo_ends_with_the_commands_to_run_next(fake_train: list,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    assert "demo finished in" in out
    after = out.split("demo finished in", 1)[1]
    for expected in ('subllm generate --checkpoint runs/default --prompt "def "',
                     "subllm eval --checkpoint runs/default",
                     "subllm export --checkpoint runs/default --out hf-out",
                     "subllm prepare --input my_corpus/ --out data/mine",
                     "subllm train --data data/mine --out runs/mine", "runs/default/loss.png"):
        assert expected in after, after
    commands = [line.split("#")[0].strip() for line in after.splitlines()
                if line.strip().startswith("subllm ")]
    assert len(commands) == 5
    for command in commands:  # every flag named is one the verb takes
        argv = shlex.split(command)[1:]
        build_parser(argv).parse_args(argv)


# ---------------------------------------------------------------------------------------------
# real (tiny) runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, prepare_corpus, tiny_settings) -> Path:
    root = tmp_path_factory.mktemp("newcomer")
    prepare_corpus(root, 20, lines=30)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(root / "data")))
    return root


def test_stop_at_says_how_to_continue(tiny: Path, capsys: pytest.CaptureFixture) -> None:
    run = tiny / "stopped run"  # a space: the command quotes it
    assert main(["train", "--config", str(tiny / "tiny.yaml"), "--out", str(run),
                 "--max-steps", "4", "--stop-at", "2", "--warmup", "5"]) == 0
    err = capsys.readouterr().err
    # the settings' warning comes once, after the run's first line (every check passed)
    lines = [x for x in err.splitlines() if x.startswith("warning: --warmup 5")]
    assert len(lines) == 1 and err.index("SUBLLM subllm-tiny") < err.index(lines[0])
    command = f"subllm train --out {shlex.quote(str(run))} --resume"
    assert f"stopped at step 2 (--stop-at); continue with: {command}" in err
    assert main(shlex.split(command)[1:]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 4
    assert "stopped at" not in capsys.readouterr().err  # it finished


@pytest.mark.parametrize("max_steps, evals", [(4, [2, 4]), (3, [2, 3])])
def test_the_final_validation_is_printed_and_logged_once(
        tiny: Path, capsys: pytest.CaptureFixture, max_steps: int, evals: list[int]) -> None:
    run = tiny / f"once-{max_steps}"
    assert main(["train", "--config", str(tiny / "tiny.yaml"), "--out", str(run),
                 "--max-steps", str(max_steps), "--eval-every", "2"]) == 0
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    for step in evals:
        said = [x for x in lines if f"step {step}: val loss" in x]
        assert len(said) == 1, lines
    final = next(x for x in captured.out.splitlines() if f"step {max_steps}: val loss" in x)
    assert "eval kept fractions" in final and "train/inference gap" in final
    assert "(keep 0.64/0.64)" in final and f"checkpoint {run}" in final
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == evals


def test_eval_shows_its_progress_on_a_terminal(tiny: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run = tiny / "once-4"
    if not run.exists():
        assert main(["train", "--config", str(tiny / "tiny.yaml"), "--out", str(run),
                     "--max-steps", "4", "--eval-every", "2"]) == 0
    argv = ["eval", "--checkpoint", str(run), "--batches", "2", "--device", "cpu", "--json"]
    capsys.readouterr()
    assert main(argv) == 0  # not a terminal (a log, a pipe): no bar
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["tokens"] > 0
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "eval:" in captured.err and "/4 " in captured.err, captured.err  # 2 batches x 2
    assert json.loads(captured.out)["tokens"] > 0  # stdout stays clean JSON


# ---------------------------------------------------------------------------------------------
# help


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    parser = build_parser([verb])
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subs.choices[verb]


@pytest.mark.parametrize("verb", [v for v in VERBS if v != "bench"])
def test_every_flag_says_what_it_does_and_its_default(verb: str) -> None:
    p = _verb_parser(verb)
    alternatives = {a for g in p._mutually_exclusive_groups if g.required
                    for a in g._group_actions}  # one of them must be given
    for action in p._actions:
        if action.dest == "help":
            continue
        text = (action.help or "").strip()
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert len(text) >= 8, f"{verb} {name}: no help"
        if action.option_strings and action.nargs != 0 and not action.required \
                and action not in alternatives:
            assert "default" in text or "required" in text, f"{verb} {name}: {text}"


def test_generate_help_explains_top_p_and_repetition_penalty(
        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "nucleus sampling: keep the smallest set of tokens whose probability sums to P" in text
    assert "penalise tokens already in the text, > 1 discourages repeats (default 1.0 = off)" \
        in text


def test_train_help_shows_the_demo_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps (the lr schedule's length) (default 1000; demo 300)" in text
    assert "Without --data and --config the demo's settings are the defaults" in text


# ---------------------------------------------------------------------------------------------
# routing.png and the busy-CPU tip


def test_the_routing_plot_labels_its_band(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from subllm.model import ModelConfig
    from subllm.train import loop, runtime

    rows = [{"step": s, "kept_fractions": [0.64, 0.64], "val_kept_fractions": [0.65, 0.63]}
            for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels: list[list[str]] = []
    real_save = runtime._save_png

    def save(fig: Any, out: Path) -> Path:
        labels.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return real_save(fig, out)

    monkeypatch.setattr(runtime, "_save_png", save)
    assert runtime.plot_routing(tmp_path, [0.64, 0.64], [1, 2], 0.02) is not None
    assert "keep \u00b1 rank_band (0.02): where inference's kept share is held" in labels[-1]
    runtime.plot_routing(tmp_path, [0.64, 0.64], [1, 2], None)
    assert not any("rank_band" in t for t in labels[-1])  # no band, none drawn
    assert (tmp_path / "routing.png").stat().st_size > 1000
    # the band is the model's: the rank rule's budget, none under another rule
    config = ModelConfig.preset("subllm-tiny")
    assert loop._held_band(config) == config.rank_band == 0.02
    assert loop._held_band(ModelConfig.from_dict({**config.to_dict(),
                                                  "threshold": "calibrated"})) is None


@pytest.mark.parametrize("load, cores, env, threads, tip", [
    (2.3, 2, {}, 2, True),  # busy: as many runnable processes as cores
    (1.2, 2, {}, 2, False),  # a core to spare
    (4.0, 2, {"OMP_NUM_THREADS": "2"}, 2, False),  # the user chose
    (4.0, 2, {"MKL_NUM_THREADS": "1"}, 2, False),
    (4.0, 2, {}, 1, False),  # torch.set_num_threads(1) already
    (4.0, 2, {"RANK": "0", "WORLD_SIZE": "2"}, 2, False),  # torchrun sets the threads
    (3.0, 1, {}, 1, False),  # one core: nothing to fight over
    (8.0, 8, {}, None, True),
])
def test_the_busy_cpu_tip(load: float, cores: int, env: dict, threads: int | None,
                          tip: bool) -> None:
    from subllm.train.runtime import thread_tip

    said = thread_tip(load, cores, env, threads)
    assert (said is not None) == tip
    if tip:
        assert said.startswith(f"tip: the CPU is busy with other work (1-minute load {load:.1f} "
                               f"on {cores} cores)")
        assert "OMP_NUM_THREADS=1 subllm train" in said and "\n" not in said
