"""Issue 28, round 3: every value and every input is checked where it enters, and Ctrl-C is
always clean.

In-process (fast): the range of every number of ModelConfig; the inputs of the model's
forward pass on the plain and the MsT (chunked) path; what the model constructors take;
`subllm info` of an argument that names nothing. Through the real CLI (slow): a bad model
value as one line; Ctrl-C in every phase of a command (loading, building the parser,
inside a verb, inside an import a C extension would swallow it in, at exit) injected at a
chosen import, and at a spread of delays after Python's own start-up; the console script
goes through the same guard."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from procs import SRC, one_line, snapshot

from subllm import ConfigError, ModelConfig, SubLLM, apply_mst
from subllm.cli import main
from subllm.model.config import PRESETS

TINY = dict(vocab_size=64, dim=32, n_layers=3, n_heads=2, ffn_dim=64, structure="T(T)T",
            keep=0.5, max_seq_len=32)


# 1. Model values -----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, valid", [
    ("balancer_strength", -0.5, "a finite number >= 0"),
    ("balancer_prob_steps", 0, "a positive integer"),
    ("balancer_margin", -5, "in [0, 1]"),
    ("balancer_prob_start", math.inf, "in [0, 1]"),
    ("balancer_prob_end", math.nan, "in [0, 1]"),
    ("bypass_limit_prob", 1.5, "in [0, 1]"),
    ("bypass_min_steps", 0, "a positive integer"),
    ("bypass_init", -0.1, "in [0, 1]"),
    ("balancer_rms_max", math.inf, "a finite number > 0"),
    ("rope_theta", math.inf, "a finite number > 1"),
    ("norm_eps", -1e-5, "a finite number > 0"),
    ("init_std", math.nan, "a finite number > 0"),
    ("threshold_decay", 1.0, "in [0, 1)"),
])
def test_an_out_of_range_model_value_is_one_line_naming_field_value_and_range(field, value,
                                                                               valid):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**TINY, field: value})
    msg = str(e.value)
    assert msg.startswith(f"{field} must be {valid}") and msg.endswith(f"got {value!r}"), msg


NUMBERS = [f for f in dataclasses.fields(ModelConfig)
           if f.type in ("int", "float", "int | None", "float | None")]


@pytest.mark.parametrize("field", NUMBERS, ids=lambda f: f.name)
def test_no_number_of_model_config_takes_nan_inf_a_bool_or_text(field):
    """The class, not the examples: every int / float field of the dataclass (so a field
    added later without a range fails here) refuses NaN, +-inf, a bool and text by name;
    an integer field also a fraction, 0 and a negative count."""
    bad = [math.nan, math.inf, -math.inf, True, "1"]
    if field.type.startswith("int"):
        bad += [2.5, 0, -1]
    for value in bad:
        got = re.escape(repr(value))
        with pytest.raises(ConfigError, match=f"^{field.name} must be .*, got {got}"):
            ModelConfig(**{**TINY, field.name: value})


def test_numbers_checked_are_most_of_the_config():
    assert len(NUMBERS) >= 25, [f.name for f in NUMBERS]


def test_the_edges_of_every_range_and_every_preset_are_accepted():
    ModelConfig(**TINY, balancer_prob_start=0.0, balancer_prob_end=1, bypass_limit_prob=0,
                balancer_strength=0.0, balancer_margin=0.0, rank_band=None,
                threshold_decay=0.0, bypass_init=1.0, bypass_min_start=1.0,
                bypass_min_end=1.0, balancer_prob_steps=1, bypass_min_steps=1, head_dim=16,
                sliding_window=None, balancer_rms_min=5.0, balancer_rms_max=5.0)
    for name in PRESETS:
        ModelConfig.preset(name)


def test_relations_between_values_and_rope_scaling_numbers_are_checked():
    for extra, fragment in (
            ({"balancer_rms_min": 6.0}, "balancer_rms_min=6.0 is above balancer_rms_max=5.0"),
            ({"bypass_min_end": 0.95}, "bypass_min_end=0.95 is above bypass_min_start=0.9"),
            ({"tie_embeddings": "yes"}, "tie_embeddings must be true or false"),
            ({"rope_scaling": {"rope_type": "linear", "factor": math.inf}}, "finite positive"),
            ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": math.nan,
                               "original_max_position_embeddings": 16}}, "'beta_fast' must be"),
            ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
             "low_freq_factor < high_freq_factor")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            ModelConfig(**{**TINY, **extra})


def test_a_number_yaml_reads_as_text_says_how_to_write_it(tmp_path):
    (tmp_path / "m.yaml").write_text("preset: subllm-tiny\nnorm_eps: 1e-5\n")  # YAML 1.1: text
    with pytest.raises(ConfigError, match=r"norm_eps must be .*got '1e-5' .*1\.0e-5"):
        ModelConfig.load(str(tmp_path / "m.yaml"))


# 2. The forward pass's inputs -------------------------------------------------------------------
@pytest.fixture(scope="module", params=["plain", "mst"])
def model(request) -> SubLLM:
    torch.manual_seed(0)
    m = SubLLM(ModelConfig(**TINY))
    if request.param == "mst":
        apply_mst(m, loss_chunks=3)
    return m


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, 64, shape)


@pytest.mark.parametrize("kwargs, fragments", [
    (lambda: dict(input_ids=ids(2, 8), labels=ids(2, 5)), ["labels", "(2, 8)", "(2, 5)"]),
    (lambda: dict(input_ids=ids(2, 8), labels=ids(8)), ["labels", "(2, 8)", "(8,)"]),
    (lambda: dict(input_ids=ids(2, 8), labels=ids(2, 8).float()), ["labels", "float32"]),
    (lambda: dict(input_ids=ids(2, 8).float()), ["input_ids", "(2, 8)", "float32"]),
    (lambda: dict(input_ids=ids(8)), ["input_ids", "(8,)"]),
    (lambda: dict(input_ids=ids(2, 8, 1)), ["input_ids", "(2, 8, 1)"]),
    (lambda: dict(input_ids=ids(2, 8), attention_mask=torch.ones(2, 5)),
     ["attention_mask", "(2, 5)", "(2, 8)"]),
    (lambda: dict(input_ids=ids(2, 8), attention_mask=torch.ones(3, 8)),
     ["attention_mask", "(3, 8)", "(2, 8)"]),
    (lambda: dict(input_ids=ids(2, 8), attention_mask=torch.ones(8)),
     ["attention_mask", "(8,)"]),
    (lambda: dict(input_ids=ids(1, 33)), ["33 tokens", "max_seq_len=32"]),
    (lambda: dict(input_ids=ids(2, 8) + 64), ["input_ids", "[0, 64)"]),
    (lambda: dict(input_ids=ids(2, 8), labels=ids(2, 8) + 64), ["label", "[0, 64)"]),
    (lambda: dict(inputs_embeds=torch.randn(2, 8, 31)), ["inputs_embeds", "(2, 8, 31)"]),
    (lambda: dict(inputs_embeds=ids(2, 8, 32)), ["inputs_embeds", "int64"]),
    (lambda: dict(input_ids=ids(2, 8), logits_to_keep=-1), ["logits_to_keep", "-1"]),
])
def test_a_bad_input_to_forward_is_one_value_error_naming_the_shapes(model, kwargs, fragments):
    with pytest.raises(ValueError) as e:
        model(**kwargs())
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg


def test_the_checks_leave_a_valid_forward_as_it_was(model):
    """The loss against torch's cross-entropy of the model's own logits (unchunked), with
    int64 and int32 labels and ignored positions; a mask as wide as the inputs, or as the
    cached tokens plus the new ones, when decoding with the cache."""
    model.eval()
    x, y = ids(2, 12), ids(2, 12)
    y[0, :3] = -100
    with torch.no_grad():
        logits = model(x).logits
        loss, loss32 = model(x, labels=y).loss, model(x, labels=y.int()).loss
        ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(),
                              ignore_index=-100)
        assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6) and torch.equal(loss, loss32)
        prompt, nxt = ids(2, 5), ids(2, 1)
        cache = model(prompt, attention_mask=torch.ones(2, 5), use_cache=True).cache
        step = model(nxt, attention_mask=torch.ones(2, 6), cache=cache).logits
        whole = model(torch.cat([prompt, nxt], 1)).logits[:, -1:]
    assert torch.allclose(step, whole, atol=1e-5)


def test_model_parts_built_from_something_else_than_a_model_config_say_what_to_pass():
    from subllm.model.llama import Block
    from subllm.model.subsample import ScoreBalancer, Subsampler

    for build, owner in ((lambda c: SubLLM(c), "SubLLM"), (lambda c: Block(c), "Block"),
                         (lambda c: Subsampler(c, 0.5), "Subsampler"),
                         (lambda c: ScoreBalancer(0.5, c), "ScoreBalancer")):
        with pytest.raises(TypeError, match=rf"^{owner}\(config\) takes a subllm.ModelConfig, "
                                            r"got dict; make one with ModelConfig.from_dict"):
            build(dict(TINY))
    with pytest.raises(TypeError, match="got str; make one with ModelConfig"):
        SubLLM("subllm-tiny")
    assert SubLLM(ModelConfig.from_dict(dict(TINY))).num_params() > 0


# 3. `subllm info` of an argument that names nothing ----------------------------------------
def test_info_says_what_was_given_and_what_it_takes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    presets = ", ".join(PRESETS)
    for arg, fragment in (("", "PRESET_OR_CONFIG is empty; pass a preset"),
                          ("no/such/path", "no/such/path does not exist; pass a preset"),
                          ("nosuch", "unknown preset 'nosuch', and no file or directory of "
                                     "that name exists; pass a preset"),
                          ("subllm-tiny ", "did you mean 'subllm-tiny'?"),
                          (".", ". is a directory without a model"),
                          ("empty", "empty is a directory without a model")):
        assert main(["info", arg]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0] and presets in err[0], err


# 4. Through the real CLI -------------------------------------------------------------------------
def run_cli(*argv: str, cwd: Path, inject: str | None = None, script: Path | None = None,
            sigint: signal.Handlers = signal.SIG_DFL) -> subprocess.CompletedProcess:
    """`python -m subllm ARGV` (or the console script `script`), with `inject` as a
    sitecustomize; SIGINT's disposition is set as given (a test run from a background job
    would otherwise hand the command an ignored SIGINT)."""
    path = [str(SRC), os.environ.get("PYTHONPATH", "")]
    if inject is not None:
        site = cwd / f"site-{abs(hash(inject))}"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(inject)
        path.insert(0, str(site))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *(["-m", "subllm"] if script is None else [str(script)]), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def interrupted(r: subprocess.CompletedProcess, line: str) -> None:
    """Exit 130, and stderr is the one line `line`: no traceback, nothing else."""
    assert r.returncode == 130 and r.stderr.strip().splitlines() == [line], (
        r.returncode, r.stderr[-3000:])


# SIGINT to itself as `module` starts to import (the handler runs a few bytecodes later)
AT_IMPORT = """
import os, signal, sys
class _Hook:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, _Hook())
"""
AT_EXIT = """
import atexit, os, signal, time
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))
"""


@pytest.mark.slow
def test_ctrl_c_in_every_phase_of_a_command_is_one_line_and_130(tmp_path):
    """SIGINT while the package loads, while the CLI module loads, while the verb's parser
    is built, inside the verb (an import `info` makes), inside an import that torch would
    swallow it in (numpy, under `eval`: the command would go on), and at exit."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # eval gets past its checks
    cases = [("subllm.errors", ["info", "subllm-tiny"], "subllm: interrupted"),
             ("argparse", ["info", "subllm-tiny"], "subllm: interrupted"),
             ("subllm.commands.info", ["info", "subllm-tiny"], "subllm info: interrupted"),
             ("subllm.planner", ["info", "subllm-tiny"], "subllm info: interrupted"),
             ("numpy", ["eval", "--checkpoint", str(tmp_path / "run")],
              "subllm eval: interrupted")]
    for module, argv, line in cases:
        interrupted(run_cli(*argv, cwd=tmp_path, inject=AT_IMPORT.format(module=module)), line)
    r = run_cli("info", "subllm-tiny", cwd=tmp_path, inject=AT_EXIT)
    interrupted(r, "subllm info: interrupted")
    assert "parameters" in r.stdout  # the command had done its work
    # a SIGINT the parent told the command to ignore stays ignored
    r = run_cli("info", "subllm-tiny", cwd=tmp_path, sigint=signal.SIG_IGN,
                inject=AT_IMPORT.format(module="subllm.planner"))
    assert r.returncode == 0 and r.stderr == "" and "parameters" in r.stdout


@pytest.mark.slow
def test_the_console_script_goes_through_the_same_guard(tmp_path):
    """The script pip writes for pyproject's [project.scripts] entry, run as pip runs it."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    module, func = pyproject["project"]["scripts"]["subllm"].split(":")
    script = tmp_path / "bin" / "subllm"
    script.parent.mkdir()
    script.write_text(f"import re\nimport sys\nfrom {module} import {func}\n"
                      "if __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      f"    sys.exit({func}())\n")
    r = run_cli("info", "subllm-tiny", cwd=tmp_path, script=script)
    assert r.returncode == 0 and "parameters" in r.stdout, r.stderr
    for module, line in (("subllm.errors", "subllm: interrupted"),
                         ("subllm.commands.info", "subllm info: interrupted"),
                         ("subllm.planner", "subllm info: interrupted")):
        interrupted(run_cli("info", "subllm-tiny", cwd=tmp_path, script=script,
                            inject=AT_IMPORT.format(module=module)), line)


READY = "import sys\nsys.stderr.write('<python started>\\n')\nsys.stderr.flush()\n"
GUARD_LINE = next(i for i, text in enumerate((SRC / "subllm" / "__init__.py").read_text()
                                             .splitlines(), 1)
                  if text.startswith("from subllm import interrupt"))


def before_the_guard(err: str) -> bool:
    """A traceback from before subllm could catch Ctrl-C: Python's own start-up, runpy
    locating the package, or the first line of `subllm/__init__.py` installing the handler;
    no frame of any other subllm code."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', err)
    ours = [(f, int(n)) for f, n in frames if f.startswith(str(SRC))]
    return err.rstrip().endswith("KeyboardInterrupt") and all(
        f.endswith("interrupt.py") or (f.endswith("__init__.py") and n == GUARD_LINE)
        for f, n in ours)


@pytest.mark.slow
@pytest.mark.parametrize("argv, code, delays", [
    (["info", "subllm-tiny"], 0, [0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8]),
    (["estimate", "--preset", "subllm-tiny", "--seq-len", "256"], 0,
     [0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8]),
    (["eval", "--checkpoint", "none"], 2, [0.0, 0.1, 0.4, 0.8]),  # torch in `run`
], ids=["info", "estimate", "eval"])
def test_ctrl_c_at_any_moment_after_python_started_is_clean(tmp_path, argv, code, delays):
    """SIGINT `delay` s after Python's own start-up (a sitecustomize says when): the one
    line and 130; or, had the command finished first, its own outcome, complete (in
    Python's own teardown, once it has given SIGINT back to the system, the process then
    ends by that signal, as a shell shows it: 130); never a traceback from subllm's code."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(READY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(SRC)]),
           "OMP_NUM_THREADS": "1"}
    verb = argv[0]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "subllm", *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stderr.readline() == "<python started>\n"
        return proc

    done = start()
    done_out, done_err = done.communicate(timeout=300)
    assert done.returncode == code and "Traceback" not in done_err, done_err[-3000:]
    for delay in delays:
        proc = start()
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        if "Traceback" in err:
            assert before_the_guard(err), (delay, err[-4000:])
        elif proc.returncode == 130:
            assert err.strip().splitlines() in ([f"subllm {verb}: interrupted"],
                                                ["subllm: interrupted"]), (delay, err)
        else:  # it was done before the signal came
            assert proc.returncode in (code, -signal.SIGINT), (delay, proc.returncode, err)
            assert (out, err) == (done_out, done_err), delay


@pytest.mark.slow
def test_a_bad_model_value_through_the_cli_is_one_line_and_writes_nothing(
        tmp_path, prepare_corpus, tiny_settings):
    data = prepare_corpus(tmp_path, 6)
    for name, model, fragment in (
            ("strength", {"balancer_strength": -1.0}, "balancer_strength must be a finite "
                                                      "number >= 0, got -1.0"),
            ("steps", {"balancer_prob_steps": 0}, "balancer_prob_steps must be a positive "
                                                  "integer, got 0"),
            ("prob", {"bypass_limit_prob": float("inf")}, "bypass_limit_prob must be in "
                                                          "[0, 1], got inf")):
        settings = tmp_path / f"{name}.yaml"
        settings.write_text(yaml.safe_dump(tiny_settings(data, model=model)))
        before = snapshot(tmp_path)
        one_line(run_cli("train", "--config", str(settings), "--out", str(tmp_path / name),
                         cwd=tmp_path), 2, "subllm train: error: ", fragment)
        assert snapshot(tmp_path) == before  # no run directory, nothing else
        bare = tmp_path / f"{name}-model.yaml"  # a model config file, as `info` reads it
        bare.write_text(yaml.safe_dump({"preset": "subllm-tiny", **model}))
        one_line(run_cli("info", str(bare), cwd=tmp_path), 2, "subllm info: error: ", fragment)


@pytest.mark.slow
def test_labels_of_the_wrong_length_for_a_patched_transformers_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2))
    apply_mst(hf)
    with pytest.raises(ValueError, match=r"labels of shape \(2, 5\) must have the inputs' shape "
                                         r"\(2, 8\)"):
        hf(input_ids=ids(2, 8), labels=ids(2, 5))
