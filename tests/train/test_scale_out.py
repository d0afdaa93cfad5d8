"""Scale-out on PyTorch's own distributed stack (gloo on CPU): FSDP2 / HSDP built on the meta
device, sharded DCP checkpoints resumed with other numbers of processes, two torchrun
"nodes", MsT under DDP and FSDP, per-rank host memory, kills during a sharded save, export.

Every multi-process run is compared with one process over the same global batches: the
weights are drawn per parameter from the seed, so any sharding starts from the same model.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from subllm.cli import main
from subllm.train import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[2] / "src"  # <repo>/tests/<package>/this file
TOL = 1e-5  # fp32 sums in another order: observed <= 7e-6 over 10 steps


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([*extra.pop("PREPEND", "").split(os.pathsep), str(SRC),
                            os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path.strip(os.pathsep), "OMP_NUM_THREADS": "1",
            **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def max_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert b.keys() <= a.keys() and b, (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) for s in b)


def torchrun(n: int, *args: str, extra_env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(n), "-m", "subllm", "train", *args]
    proc = subprocess.run(cmd, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, prepare_corpus, tiny_settings) -> Path:
    root = tmp_path_factory.mktemp("scale-out")
    prepare_corpus(root, 40, lines=40)
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_settings(root / "data")))
    return root


def common(work: Path, run: Path, *flags: str) -> tuple[str, ...]:
    return ("--config", str(work / "tiny.yaml"), "--out", str(run), "--max-steps", "10",
            *flags)


@pytest.fixture(scope="module")
def single(work: Path) -> Path:
    """10 steps in one process, global batch 4: the reference."""
    out = work / "single"
    assert main(["train", *common(work, out, "--batch-size", "4")]) == 0
    return out


@pytest.fixture(scope="module")
def fsdp2(work: Path, single: Path) -> Path:
    """10 steps with 2 FSDP processes, saving (sharded) at steps 5 and 10."""
    out = work / "fsdp2"
    torchrun(2, *common(work, out, "--batch-size", "2", "--distributed", "fsdp",
                        "--save-every", "5"))
    return out


@pytest.mark.slow
def test_fsdp_and_hsdp_equal_one_process_and_resume_with_other_world_sizes(
        work: Path, single: Path, fsdp2: Path) -> None:
    ref = losses(single)
    assert sorted(losses(fsdp2)) == list(range(1, 11))
    assert max_diff(ref, losses(fsdp2)) < TOL
    saved = ckpt.latest_checkpoint(fsdp2)
    assert ckpt.is_sharded(saved) and not (saved / "model.safetensors").exists()
    assert sorted(p.name for p in (saved / ckpt.SHARDED).glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shards
    assert "optimizer" not in ckpt.load_train_state(saved)  # it is sharded too

    # 2 -> 4 processes: resume from step 5
    grown = work / "grown"
    shutil.copytree(fsdp2, grown)
    shutil.rmtree(grown / "checkpoints" / "step-00000010")
    proc = torchrun(4, "--out", str(grown), "--resume", "--batch-size", "1")
    assert "resuming from" in proc.stderr and "(step 5)" in proc.stderr
    assert max_diff(ref, losses(grown)) < TOL and max(losses(grown)) == 10

    # 4 processes as HSDP (2 replicas x 2 shards) to step 5, then 4 -> 2 processes (FSDP)
    hsdp = work / "hsdp"
    torchrun(4, *common(work, hsdp, "--batch-size", "1", "--distributed", "fsdp",
                        "--replicate", "2", "--stop-at", "5"))
    assert max(losses(hsdp)) == 5 and max_diff(ref, losses(hsdp)) < TOL
    torchrun(2, "--out", str(hsdp), "--resume", "--batch-size", "2", "--replicate", "1")
    assert sorted(losses(hsdp)) == list(range(1, 11))
    assert max_diff(ref, losses(hsdp)) < TOL


@pytest.mark.slow
def test_an_unsharded_checkpoint_resumes_sharded(work: Path, single: Path) -> None:
    """One process writes model.safetensors + state.pt; 2 FSDP ranks read each tensor and
    keep their shard, and the full optimizer state, then save sharded."""
    run = work / "one-then-fsdp"
    assert main(["train", *common(work, run, "--batch-size", "4", "--stop-at", "5")]) == 0
    assert (ckpt.latest_checkpoint(run) / "model.safetensors").is_file()
    torchrun(2, "--out", str(run), "--resume", "--distributed", "fsdp", "--batch-size", "2")
    assert max_diff(losses(single), losses(run)) < TOL and max(losses(run)) == 10
    assert ckpt.is_sharded(ckpt.latest_checkpoint(run))


@pytest.mark.slow
def test_export_consolidates_a_sharded_checkpoint_without_torchrun(
        fsdp2: Path, tmp_path: Path) -> None:
    """`subllm export` of a sharded run (one process, no process group) against PyTorch's
    own consolidation of the same DCP directory (format_utils.dcp_to_torch_save)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    from subllm import ModelConfig, SubLLM

    saved = ckpt.latest_checkpoint(fsdp2)
    assert main(["export", "--checkpoint", str(fsdp2), "--out", str(tmp_path / "hf")]) == 0
    dcp_to_torch_save(saved / ckpt.SHARDED, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)["model"]
    reference = SubLLM(ModelConfig.from_dict(ckpt.load_model_config(saved)))
    reference.load_state_dict(whole)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                    trust_remote_code=True)
    x = torch.randint(0, reference.config.vocab_size, (2, 24))
    with torch.no_grad():
        a = reference.eval()(x).logits
        b = exported.eval()(x).logits
    assert torch.equal(a, b)


# Rank 0 stops for good once the shards of step 4 are written, before state.pt and the
# rename; the test then kills every process of the job (torchrun starts each worker in a
# session of its own, so each one says its pid).
KILL_DURING_SHARDED_SAVE = """
import os, time
from pathlib import Path
if "RANK" in os.environ:  # the rank itself comes first; a process it starts inherits RANK
    try:
        with open(os.environ["FLAG"] + ".pid" + os.environ["RANK"], "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        pass
if os.environ.get("RANK") == "0":
    import subllm.train.checkpoint as c
    original = c.save_checkpoint
    def stalled(run_dir, step, *args, **kwargs):
        if step == 4:
            Path(os.environ["FLAG"]).write_text("shards written")
            time.sleep(600)
        return original(run_dir, step, *args, **kwargs)
    c.save_checkpoint = stalled
"""


@pytest.mark.slow
def test_sigkill_during_a_sharded_save_leaves_the_previous_checkpoint_loadable(
        work: Path, single: Path, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(KILL_DURING_SHARDED_SAVE)
    run, flag = work / "killed", tmp_path / "flag"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "subllm", "train",
           *common(work, run, "--batch-size", "2", "--distributed", "fsdp", "--save-every",
                   "2", "--dist-timeout", "120")]
    proc = subprocess.Popen(cmd, env=env(PREPEND=str(tmp_path), FLAG=str(flag)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not flag.exists():
            assert proc.poll() is None, "the run ended before reaching the checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent
        proc.wait(timeout=60)
        for rank in (0, 1):
            pid_file = Path(f"{flag}.pid{rank}")
            if pid_file.exists():
                _kill_and_wait(int(pid_file.read_text()))
        _kill_processes_naming(run)  # and anything else of that run (the ranks' own sessions)
    staged = list((run / "checkpoints").glob(".tmp-step-00000004-*"))
    assert staged and (staged[0] / ckpt.SHARDED / ".metadata").is_file()  # shards were done
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002"]
    assert ckpt.damage(ckpt.latest_checkpoint(run)) is None
    # loadable: resumed in one process (2 -> 1), the same losses as the reference
    assert main(["train", "--out", str(run), "--resume", "--batch-size", "4",
                 "--stop-at", "4"]) == 0
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert sorted(losses(run)) == [1, 2, 3, 4] and max_diff(losses(single), losses(run)) < TOL


def _kill_processes_naming(path: Path) -> None:
    """SIGKILL every process whose command line names `path`, and wait for each."""
    needle = str(path).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            named = needle in cmdline.read_bytes()
        except OSError:
            continue
        if named and int(cmdline.parent.name) != os.getpid():
            _kill_and_wait(int(cmdline.parent.name))


def _kill_and_wait(pid: int) -> None:
    """SIGKILL `pid` and wait until it holds nothing: gone, or a zombie none of whose
    threads is still exiting (a zombie leader's threads keep its files and locks)."""
    from subllm.atomic import _alive

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.slow
def test_a_damaged_sharded_checkpoint_is_found_and_skipped(fsdp2: Path, work: Path) -> None:
    run = work / "damaged"
    shutil.copytree(fsdp2, run)
    shard = ckpt.latest_checkpoint(run) / ckpt.SHARDED / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # a truncated copy
    why = ckpt.damage(shard.parents[1])
    assert why is not None and "__1_0.distcp is truncated" in why
    assert ckpt.damage(run / "checkpoints" / "step-00000005") is None
    rc = main(["train", "--out", str(run), "--resume", "--max-steps", "10"])
    assert rc == 2  # names the intact step-5 and offers --skip-damaged
    assert main(["train", "--out", str(run), "--resume", "--skip-damaged", "--batch-size",
                 "4", "--stop-at", "6"]) == 0
    assert (run / "checkpoints" / "damaged-step-00000010").is_dir()


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes_train_checkpoint_and_resume(
        work: Path, single: Path) -> None:
    """The multi-node recipe on one machine: two agents, one process each, c10d rendezvous;
    with --async-checkpoint and --keep-checkpoints."""
    run = work / "two-nodes"

    def two_nodes(*flags: str) -> None:
        port = free_port()
        agents = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two-nodes-{port}",
             "-m", "subllm", "train", *flags],
            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for node in (0, 1)]
        for a in agents:
            _, err = a.communicate(timeout=300)
            assert a.returncode == 0, err[-3000:]

    # checkpoints at 2 and 4 written in the background, 5 (the last) at once; 2 pruned
    two_nodes(*common(work, run, "--batch-size", "2", "--distributed", "fsdp",
                      "--stop-at", "5", "--save-every", "2", "--keep-checkpoints", "2",
                      "--async-checkpoint"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000004", "step-00000005"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    shutil.rmtree(run / "checkpoints" / "step-00000005")  # resume from the background one
    two_nodes("--out", str(run), "--resume")
    assert sorted(losses(run)) == list(range(1, 11))
    assert max_diff(losses(single), losses(run)) < TOL


# MsT chunks only sequences of >= 1024 tokens (MLP) / 256 (loss) by default: chunk these
# 64-token ones too, in the test's own process and in every rank.
SMALL_CHUNKS = """
import functools
import subllm.train.loop as loop
loop.apply_mst = functools.partial(loop.apply_mst, min_chunk_tokens=8)
"""


@pytest.mark.slow
def test_mst_under_ddp_and_fsdp_equals_one_process(work: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import subllm.train.loop as loop

    monkeypatch.setattr(loop, "apply_mst", functools.partial(loop.apply_mst,
                                                             min_chunk_tokens=8))
    one = work / "mst-1"
    flags = ("--max-steps", "4", "--mst", "--checkpointing")
    assert main(["train", *common(work, one, "--batch-size", "4"), *flags]) == 0
    (tmp_path / "sitecustomize.py").write_text(SMALL_CHUNKS)
    for engine in ("ddp", "fsdp"):
        run = work / f"mst-{engine}"
        torchrun(2, *common(work, run, "--batch-size", "2", "--distributed", engine), *flags,
                 extra_env={"PREPEND": str(tmp_path)})
        assert sorted(losses(run)) == [1, 2, 3, 4]
        assert max_diff(losses(one), losses(run)) < TOL, engine


def test_fsdp_mixed_precision_gathers_bf16_and_keeps_fp32_shards_and_gradients(
        tmp_path: Path) -> None:
    """--distributed fsdp --dtype bf16 (one rank, gloo): blocks compute with bf16 weights,
    the sharded parameters and their gradients stay fp32."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from subllm import ModelConfig
    from subllm.train.config import TrainConfig
    from subllm.train.loop import _build_model
    from subllm.train.runtime import Dist, autocast

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        config = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2, ffn_dim=64,
                             structure="T(T)T", max_seq_len=32)
        raw, model = _build_model(TrainConfig(distributed="fsdp"), config, Dist(0, 1, 0, True),
                                  torch.device("cpu"), torch.bfloat16, None, True)
        seen = []
        raw.layers[1].mlp.down_proj.register_forward_pre_hook(
            lambda m, _: seen.append(m.weight.dtype))
        x = torch.randint(0, 64, (2, 16))
        with autocast(torch.device("cpu"), torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        w = raw.layers[1].mlp.down_proj.weight
        assert seen == [torch.bfloat16]
        assert isinstance(w, DTensor) and w.dtype == torch.float32
        assert isinstance(w.grad, DTensor) and w.grad.dtype == torch.float32
    finally:
        dist.destroy_process_group()


# Per-rank host memory of each phase, from outside the product: the peak (VmHWM) is reset
# when a wrapped function starts and read when it returns.
MEMORY = """
import json, os
from pathlib import Path
def status():
    d = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
    return {k: int(d[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
import subllm.train.loop as loop
def wrap(name):
    fn = getattr(loop, name)
    def wrapped(*a, **k):
        Path("/proc/self/clear_refs").write_text("5")
        before = status()["VmRSS"]
        try:
            return fn(*a, **k)
        finally:
            with open(os.environ["MEM_LOG"], "a") as f:
                f.write(json.dumps({"rank": int(os.environ["RANK"]), "fn": name,
                                    "before": before, "peak": status()["VmHWM"]}) + "\\n")
    setattr(loop, name, wrapped)
for name in ("_setup", "_build_model", "save", "_restore"):
    wrap(name)
"""


@pytest.mark.slow
def test_each_rank_holds_about_its_shard_at_start_up_save_and_resume(
        work: Path, tmp_path: Path) -> None:
    """A 55 M-parameter LLaMA (W = 219 MB of fp32 weights; with AdamW 3W = 656 MB) on 4
    FSDP processes. Per rank, the peak of each phase above the rank's RSS when setup began
    (torch and the data loaded, no model, no checkpoint read): start-up < 0.6 W (only
    weights exist then; a full model alone is 1.0 W), every save and the resume < 0.6 x 3W
    (gathering the model and optimizer to rank 0, or reading them whole, is >= 1.25 x 3W).
    glibc is told to return freed blocks (a fixed mmap threshold), so RSS follows what the
    process holds."""
    (tmp_path / "sitecustomize.py").write_text(MEMORY)
    log = tmp_path / "memory.jsonl"
    big = {"model": {"dim": 512, "n_heads": 8, "ffn_dim": 1536, "n_layers": 16,
                     "max_seq_len": 64, "structure": "T" * 16},
           "preset": "llama-tiny", "seq-len": 32, "batch-size": 1, "eval-batches": 1,
           "eval-every": 0, "save-every": 1, "max-steps": 3, "stop-at": 2}
    settings = {**yaml.safe_load((work / "tiny.yaml").read_text()), **big}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(settings))
    run = tmp_path / "run"
    extra = {"PREPEND": str(tmp_path), "MEM_LOG": str(log), "MALLOC_MMAP_THRESHOLD_": "131072"}
    torchrun(4, "--config", str(tmp_path / "big.yaml"), "--out", str(run), "--distributed",
             "fsdp", extra_env=extra)
    with log.open("a") as f:
        f.write("resume\n")
    torchrun(4, "--out", str(run), "--resume", "--stop-at", "3", extra_env=extra)
    from subllm import ModelConfig

    config = ModelConfig.from_dict(ckpt.load_model_config(ckpt.latest_checkpoint(run)))
    W = 4 * sum(v for v in _param_counts(config))  # noqa: N806 - bytes of fp32 weights
    assert 200e6 < W < 240e6
    first, second = log.read_text().split("resume\n")
    for part, phases in ((first, ("start-up", "save")), (second, ("resume", "save"))):
        rows = [json.loads(line) for line in part.splitlines()]
        base = {r["rank"]: r["before"] for r in rows if r["fn"] == "_setup"}
        assert sorted(base) == [0, 1, 2, 3]
        for r in (r for r in rows if r["fn"] != "_setup"):  # _setup: the baseline only
            above = (r["peak"] - base[r["rank"]]) / W
            print(f"rank {r['rank']} {r['fn']}: {(r['peak'] - base[r['rank']]) / 1e6:.0f} MB "
                  f"= {above:.2f} W")
            if r["fn"] == "_build_model" and "start-up" in phases:
                assert above < 0.6, (r, above)
            else:
                assert above < 0.6 * 3, (r, above)
        if "resume" in phases:
            assert any(r["fn"] == "_restore" for r in rows)


def _param_counts(config) -> list[int]:
    from subllm import SubLLM

    with torch.device("meta"):
        model = SubLLM(config)
    return [p.numel() for p in model.parameters()]


def test_seeded_init_does_not_depend_on_how_the_model_was_built() -> None:
    """init_weights(seed): a model built normally and one built on the meta device and
    allocated with to_empty get the same weights, tied weights tied again; the global RNG
    is not drawn from."""
    from subllm import ModelConfig, SubLLM

    config = ModelConfig.preset("subllm-tiny")
    assert config.tie_embeddings
    torch.manual_seed(1)
    a = SubLLM(config)
    a.init_weights(seed=3)
    with torch.device("meta"):
        b = SubLLM(config)
    b.to_empty(device="cpu")
    state = torch.get_rng_state()
    b.init_weights(seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert b.lm_head.weight is b.embed_tokens.weight
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    b.init_weights(seed=4)
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, b.layers[0].mlp.up_proj.weight)
