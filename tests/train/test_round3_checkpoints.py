"""Checkpoint integrity (issue 28): every checkpoint records the size and sha256 of its files
(manifest.json); a changed byte anywhere (safetensors data, a DCP shard, state.pt, a config)
is found before resuming, evaluating, exporting or generating from it and said in one line,
`--resume --skip-damaged` steps past it; a new checkpoint that does not verify, or a
validation loss that has blown up, never costs the run an intact older checkpoint; and a
write the operating system refuses while saving is one line naming it, with no half
checkpoint. Checkpoints saved before manifest.json existed still load.

A refused write is real where the test can cause one: RLIMIT_FSIZE makes the kernel refuse
(EFBIG) every write past a size, whichever library writes; a full disk (ENOSPC) is injected
into a Python-level write (`inject=`, as in tests/test_reliability_cli.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from procs import cli, one_line, snapshot

from subllm.errors import SubLLMError
from subllm.train import checkpoint as ckpt

STEP2, STEP4 = "step-00000002", "step-00000004"


# In-process: the manifest, verification, pruning, the writers' errors. ----------------------
def _save(run: Path, step: int, keep: int | None = None) -> Path:
    """A checkpoint of fresh random tensors (what is in it does not matter here)."""
    tok = run.parent / "tokenizer.json"
    tok.write_text(json.dumps({"model": {"vocab": {str(i): i for i in range(20)}}}))
    weights = {"w": torch.randn(16, 8), "b": torch.randn(8)}
    weights["tied"] = weights["w"]
    state = {"optimizer": {"exp_avg": torch.randn(16, 8)}, "data": {"pos": 3}}
    return ckpt.save_checkpoint(run, step, weights, state, {"dim": 8}, {"lr": 0.1}, tok,
                                keep=keep)


def _flip(path: Path, start: int = 0) -> int:
    """Invert one byte of `path`, chosen at random at or after `start`; its offset."""
    data = bytearray(path.read_bytes())
    at = random.randrange(start, len(data))
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return at


def _data_start(safetensors: Path) -> int:
    """Where the tensor bytes of a .safetensors file begin (past its header)."""
    with open(safetensors, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_the_manifest_records_every_file_and_damage_names_a_changed_byte(
        tmp_path: Path) -> None:
    final = _save(tmp_path / "run", 5)
    files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    manifest = json.loads((final / ckpt.MANIFEST).read_text())["files"]
    assert sorted(manifest) == [f for f in files if f != ckpt.MANIFEST]
    for name, entry in manifest.items():  # hashed here, by hashlib, not by the product
        data = (final / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.damage(final) is None
    for name in manifest:
        copy = tmp_path / f"copy-{name}" / final.name
        shutil.copytree(final, copy)
        start = _data_start(copy / name) if name.endswith(".safetensors") else 0
        at = _flip(copy / name, start)
        why = ckpt.damage(copy)
        assert why == f"{name} does not match its checksum: its bytes changed after it was " \
                      "saved", (name, at, why)
        # loading weights does not need state.pt: a change there does not stop eval/export
        assert (ckpt.damage(copy, state=False) is None) == (name == "state.pt"), name
    short = tmp_path / "short" / final.name
    shutil.copytree(final, short)
    size = manifest["state.pt"]["bytes"]
    (short / "state.pt").write_bytes((short / "state.pt").read_bytes()[:-1])
    assert ckpt.damage(short) == f"state.pt is truncated ({size - 1} of {size} bytes)"
    (short / "state.pt").write_bytes((final / "state.pt").read_bytes() + b"\0")
    assert ckpt.damage(short) == f"state.pt has {size + 1} bytes, {size} when it was saved"
    (final / ckpt.MANIFEST).write_text("{not json")
    assert ckpt.damage(final).startswith(f"{ckpt.MANIFEST} unreadable")


def test_a_checkpoint_saved_before_manifests_is_checked_and_loaded_as_before(
        tmp_path: Path) -> None:
    final = _save(tmp_path / "run", 5)
    weights = ckpt.load_weights(final)
    (final / ckpt.MANIFEST).unlink()
    assert ckpt.damage(final) is None
    assert ckpt.resolve_checkpoint(tmp_path / "run") == final
    again = ckpt.load_weights(final)
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    data = (final / "model.safetensors").read_bytes()
    (final / "model.safetensors").write_bytes(data[: len(data) // 2])  # the header checks
    assert "model.safetensors unreadable" in ckpt.damage(final)


def test_no_older_checkpoint_is_pruned_for_a_new_one_that_does_not_verify(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _save(run, 1, keep=2)
    _save(run, 2, keep=2)
    before = snapshot(run)
    write_manifest = ckpt._write_manifest

    def lost_on_the_way(tmp: Path, known: object) -> None:  # bytes that did not land
        write_manifest(tmp, known)
        _flip(tmp / "model.safetensors", _data_start(tmp / "model.safetensors"))

    monkeypatch.setattr(ckpt, "_write_manifest", lost_on_the_way)
    with pytest.raises(SubLLMError, match="does not read back as it was written .*"
                       "model.safetensors does not match its checksum.*no older checkpoint "
                       "was pruned"):
        _save(run, 3, keep=2)
    assert {k: v for k, v in snapshot(run).items() if "step-00000003" not in k} == before
    monkeypatch.setattr(ckpt, "_write_manifest", write_manifest)
    _save(run, 4, keep=2)  # one that verifies prunes as before
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000003", "step-00000004"]


def test_the_checkpoint_writers_raise_the_os_error_of_a_refused_write(tmp_path: Path) -> None:
    """The kernel refuses writes past RLIMIT_FSIZE (EFBIG): safetensors reports it in a
    SafetensorError, torch.save in a RuntimeError; both must come out as that OSError."""
    weights = {"w": torch.randn(64, 64)}  # 16 KiB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a killed process
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        caught = []
        for write, name in ((ckpt._write_weights, "model.safetensors"),
                            (ckpt._write_state, "state.pt")):
            try:
                write(tmp_path / name, weights)
            except OSError as e:
                caught.append((e.errno, e.filename))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert caught == [(errno.EFBIG, str(tmp_path / "model.safetensors")),
                      (errno.EFBIG, str(tmp_path / "state.pt"))]


# Through the real CLI. ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_group() -> dict[str, str]:
    """The environment torchrun gives a 1-process group (gloo on CPU): `subllm train
    --distributed fsdp` then saves sharded checkpoints."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, prepare_corpus, tiny_settings) -> Path:
    """data/, tiny.yaml, and two runs checkpointed at steps 2 and 4 of 6: single/ (one
    process: model.safetensors) and sharded/ (FSDP2 in a 1-process group: sharded/*.distcp)."""
    root = tmp_path_factory.mktemp("round3-checkpoints")
    prepare_corpus(root, 40, lines=40)
    settings = tiny_settings(root / "data", **{"save-every": 2, "max-steps": 6})
    (root / "tiny.yaml").write_text(yaml.safe_dump(settings))
    for name, extra in (("single", {}), ("sharded", _one_process_group())):
        with pytest.MonkeyPatch.context() as mp:
            for k, v in extra.items():
                mp.setenv(k, v)
            flags = ("--distributed", "fsdp") if extra else ()
            r = cli("train", "--config", str(root / "tiny.yaml"), "--out", str(root / name),
                    "--stop-at", "4", *flags)
        assert r.returncode == 0, r.stderr[-2000:]
    assert ckpt.is_sharded(root / "sharded" / "checkpoints" / STEP4)
    return root


def _copy(work: Path, name: str, tmp_path: Path) -> Path:
    run = tmp_path / name
    shutil.copytree(work / name, run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("kind, file", [("single", "model.safetensors"),
                                        ("sharded", "sharded/__0_0.distcp")])
def test_a_changed_byte_is_refused_in_one_line_and_skipped_on_request(
        work: Path, tmp_path: Path, kind: str, file: str) -> None:
    run = _copy(work, kind, tmp_path)
    newest = run / "checkpoints" / STEP4
    start = _data_start(newest / file) if file.endswith(".safetensors") else 0
    at = _flip(newest / file, start)
    before = snapshot(run)
    said = f"{file} does not match its checksum"
    for verb in ("eval", "export", "generate") if kind == "single" else ("eval",):
        argv = [verb, "--checkpoint", str(run)]
        if verb == "export":
            argv += ["--out", str(tmp_path / "hf")]
        one_line(cli(*argv), 2, f"{STEP4} is damaged", said, STEP2)
    line = one_line(cli("train", "--out", str(run), "--resume"), 2, f"{STEP4} is damaged",
                    said, STEP2, "--skip-damaged")
    assert "weights_only" not in line
    assert snapshot(run) == before, at
    assert not (tmp_path / "hf").exists()
    r = cli("train", "--out", str(run), "--resume", "--skip-damaged")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"warning: checkpoint {STEP4} is damaged ({said}" in r.stderr
    assert f"resuming from {STEP2}" in r.stderr
    aside = run / "checkpoints" / f"damaged-{STEP4}"  # kept, byte for byte
    assert {k.replace(str(aside), str(newest)): v for k, v in snapshot(aside).items()} == {
        k: v for k, v in before.items() if k.startswith(str(newest) + os.sep)}
    step2 = run / "checkpoints" / STEP2
    assert snapshot(step2) == {k: v for k, v in before.items()
                               if k.startswith(str(step2) + os.sep)}
    assert ckpt.damage(run / "checkpoints" / "step-00000006") is None


@pytest.mark.slow
def test_an_unreadable_shard_of_a_checkpoint_without_checksums_is_one_line(
        work: Path, tmp_path: Path) -> None:
    """Saved before manifest.json, so only reading finds it: one line, not DCP's traceback."""
    run = _copy(work, "sharded", tmp_path)
    for manifest in run.glob(f"checkpoints/*/{ckpt.MANIFEST}"):
        manifest.unlink()
    shard = run / "checkpoints" / STEP4 / "sharded" / "__0_0.distcp"
    shard.write_bytes(bytes(b ^ 0xFF for b in shard.read_bytes()))
    assert ckpt.damage(shard.parents[1]) is None  # whole, as far as the headers tell
    before = snapshot(run)
    for verb in ("eval", "train"):
        argv = ("eval", "--checkpoint", str(run)) if verb == "eval" else (
            "train", "--out", str(run), "--resume")
        one_line(cli(*argv), 2, f"cannot read {shard.parent}", f"{STEP4} is damaged")
    assert snapshot(run) == before


def _scale_tensor(safetensors: Path, name: str, factor: float) -> None:
    """Multiply one fp32 tensor of a .safetensors file in place, header untouched: the
    file still passes every check there was before checksums."""
    data = bytearray(safetensors.read_bytes())
    header = json.loads(data[8:_data_start(safetensors)])
    lo, hi = (_data_start(safetensors) + o for o in header[name]["data_offsets"])
    values = np.frombuffer(bytes(data[lo:hi]), dtype=np.float32) * factor
    data[lo:hi] = values.astype(np.float32).tobytes()
    safetensors.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_blown_up_validation_loss_never_prunes_an_intact_checkpoint(
        work: Path, tmp_path: Path) -> None:
    """The issue's run: a checkpoint whose weights were damaged without a checksum to say so
    (saved before manifests) resumes, and its loss is in the hundreds. Its saves must not
    prune the intact older checkpoints, and no perplexity is printed as 200 digits."""
    run = _copy(work, "single", tmp_path)
    for manifest in run.glob(f"checkpoints/*/{ckpt.MANIFEST}"):
        manifest.unlink()
    _scale_tensor(run / "checkpoints" / STEP4 / "model.safetensors", "embed_tokens.weight",
                  1000.0)
    intact = snapshot(run / "checkpoints" / STEP2)
    r = cli("train", "--out", str(run), "--resume", "--max-steps", "8", "--eval-every", "2",
            "--keep-checkpoints", "2")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"warning: the validation loss at step 6 is [\d.e+]+, worse than a "
                     r"uniform guess", r.stderr), r.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(run)] == [
        STEP2, STEP4, "step-00000006", "step-00000008"]
    assert snapshot(run / "checkpoints" / STEP2) == intact
    assert not re.search(r"\d{20}", r.stdout + r.stderr), r.stdout + r.stderr[-2000:]
    r = cli("eval", "--checkpoint", str(run), "--batches", "2")
    assert r.returncode == 0 and re.search(r"perplexity \d\.\d\de\+\d+ \|", r.stdout), r.stdout


# A write the kernel refuses (RLIMIT_FSIZE: EFBIG past `limit` bytes), or a full disk (ENOSPC)
# under torch.save's writes of state.pt.
FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
"""

FULL_DISK_AT_STATE = """
import builtins, errno
_open = builtins.open
class Full:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
def full_open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    return Full(f) if str(file).endswith("state.pt") and "w" in mode else f
builtins.open = full_open
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind, fails", [("single", "model.safetensors"),
                                         ("single", "state.pt"),
                                         ("single", "state.pt ENOSPC"),
                                         ("sharded", "__0_0.distcp")])
def test_a_write_refused_while_saving_is_one_line_and_leaves_no_half_checkpoint(
        work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
        fails: str) -> None:
    run = _copy(work, kind, tmp_path)
    newest = run / "checkpoints" / STEP4
    largest_other = max(p.stat().st_size for p in run.rglob("*.png"))
    if fails == "state.pt ENOSPC":
        inject, said = FULL_DISK_AT_STATE, ("No space left on device", "state.pt",
                                            "free some space")
    else:
        # above every file written before (and after) the save, below the one that fails
        size = {name: p.stat().st_size for name, p in (
            ("weights", newest / "model.safetensors"), ("state", newest / "state.pt"),
            ("shard", newest / "sharded" / "__0_0.distcp")) if p.is_file()}
        limit = {"model.safetensors": lambda: size["weights"] // 2,
                 "state.pt": lambda: (size["weights"] + size["state"]) // 2,
                 "__0_0.distcp": lambda: size["shard"] // 2}[fails]()
        assert largest_other < limit
        # (DCP's writer does not say which shard file it was writing)
        inject = FILE_SIZE_LIMIT.format(limit=limit)
        said = ("File too large", fails) if kind == "single" else ("File too large",)
    if kind == "sharded":
        for k, v in _one_process_group().items():
            monkeypatch.setenv(k, v)
    before = snapshot(run / "checkpoints")
    r = cli("train", "--out", str(run), "--resume", *(("--distributed", "fsdp")
                                                      if kind == "sharded" else ()),
            cwd=tmp_path, inject=inject)
    line = one_line(r, 2, *said, "while writing checkpoint step-00000006",
                    f"{STEP4} is intact (continue with --resume)")
    assert "damaged" not in line
    assert snapshot(run / "checkpoints") == before  # no step-6, no .tmp-*, the rest as it was


@pytest.mark.slow
def test_export_onto_a_full_disk_says_so_not_that_a_file_is_damaged(work: Path,
                                                                      tmp_path: Path) -> None:
    weights = work / "single" / "checkpoints" / STEP4 / "model.safetensors"
    before = snapshot(work / "single")
    line = one_line(cli("export", "--checkpoint", str(work / "single"), "--out",
                        str(tmp_path / "hf"), cwd=tmp_path,
                        inject=FILE_SIZE_LIMIT.format(limit=weights.stat().st_size // 2)),
                    1, "File too large")
    assert "damaged" not in line
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("inject-")] == []
    assert snapshot(work / "single") == before
