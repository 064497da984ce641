"""Checkpoint and DeepSpeed defects: a step that vanished mid-replace, export of a pipeline checkpoint, NVMe swap
folders left behind by dead runs, a DeepSpeed config file that is not JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_plan, run_cli

from parallelkit.checkpoint import format as checkpoint
from parallelkit.config import resume
from parallelkit.config.errors import ConfigError
from parallelkit.config.resume import resolve_resume
from parallelkit.models.gpt import GPT, GPTConfig


# ---- 1. a crash between renaming the old step_N aside and the new one into place ----
def _complete_step(folder: Path, step: int) -> Path:
    """A checkpoint folder as save() leaves it (meta.json and the marker; the weights do not matter here)."""
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"format": "portable", "step": step}))
    (folder / checkpoint.COMPLETE).write_text(f"step {step} written by every rank\n")
    return folder


def test_step_renamed_aside_by_a_crashed_replace_is_recovered(tmp_path):
    ck = tmp_path / "ck"
    _complete_step(ck / "step_2", 2)
    _complete_step(ck / ".step_4.replaced", 4)  # the old step_4, renamed aside; the crash came before the new one
    (ck / "step_4.incomplete").mkdir()  # the new one, never renamed into place
    assert [s for s, _ in resume.complete_steps(ck)] == [2, 4]
    assert (ck / "step_4" / checkpoint.COMPLETE).is_file() and not (ck / ".step_4.replaced").exists()
    assert resolve_resume("latest", str(ck)) == ck / "step_4"


def test_resume_of_the_checkpoint_dir_and_export_of_the_step_find_the_vanished_step(tmp_path):
    from parallelkit.export import find_checkpoint

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for ck in (a, b, c):
        _complete_step(ck / ".step_6.replaced", 6)
    assert resolve_resume(str(a), None) == a / "step_6"  # checkpoint.resume=<checkpoint.dir>
    assert find_checkpoint(b / "step_6") == b / "step_6"  # python -m parallelkit.export <checkpoint.dir>/step_6
    assert "step_6" in resume.last_complete(c) and (c / "step_6" / checkpoint.COMPLETE).is_file()


def test_a_replaced_folder_without_its_marker_is_not_recovered(tmp_path):
    ck = tmp_path / "ck"
    (ck / ".step_4.replaced").mkdir(parents=True)  # half removed: no marker
    assert resume.complete_steps(ck) == [] and not (ck / "step_4").exists()


def test_replaced_folder_beside_a_complete_step_is_left_out(tmp_path):
    """The crash after the new step_N was renamed into place: step_N is the new one, the old one is dropped."""
    ck = tmp_path / "ck"
    _complete_step(ck / "step_4", 4)
    (ck / "step_4" / "new").write_text("")
    _complete_step(ck / ".step_4.replaced", 4)
    assert resume.complete_steps(ck) == [(4, ck / "step_4")] and (ck / "step_4" / "new").exists()


def test_save_syncs_the_data_before_the_marker_and_the_folder_after_the_renames(tmp_path, monkeypatch):
    """The order of a real save (one process): data synced, then the marker written and synced, then each rename
    followed by an fsync of checkpoint.dir."""
    events: list[tuple[str, str]] = []
    real_fsync, real_open, real_rename = os.fsync, os.open, Path.rename
    names: dict[int, str] = {}

    def open_(p, flags, *a, **k):
        fd = real_open(p, flags, *a, **k)
        names[fd] = str(p)
        return fd

    def fsync(fd):
        events.append(("fsync", names.get(fd, "?")))
        if names.get(fd, "").endswith(("shard.bin", "meta.json")):  # data synced before the marker exists
            assert not (tmp_path / "ck" / "step_2.incomplete" / checkpoint.COMPLETE).exists()
        return real_fsync(fd)

    def rename(self, target):
        events.append(("rename", f"{self.name}->{Path(target).name}"))
        return real_rename(self, target)

    plan = compose_plan("strategy=ddp", "checkpoint.format=native", f"checkpoint.dir={tmp_path / 'ck'}")

    class Ctx:
        rank, device, layout = 0, __import__("torch").device("cpu"), plan.layout

    class Strategy:  # a native save in one process: the folder save() hands it, filled with a shard
        ctx = Ctx()

        def save(self, path):
            (Path(path) / "shard.bin").write_bytes(b"x" * 10)

    _complete_step(tmp_path / "ck" / "step_2", 2)  # an earlier run's step_2: replaced
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    final = checkpoint.save(Strategy(), plan.cfg, 2)
    assert (final / "shard.bin").read_bytes() == b"x" * 10 and (final / checkpoint.COMPLETE).is_file()

    def first(kind, suffix):
        return next(i for i, (k, n) in enumerate(events) if k == kind and n.endswith(suffix))

    marker_synced = first("fsync", f"incomplete/{checkpoint.COMPLETE}")
    assert first("fsync", "shard.bin") < marker_synced and first("fsync", "meta.json") < marker_synced
    renames = [i for i, (k, _) in enumerate(events) if k == "rename"]
    assert len(renames) == 2 and renames[0] > marker_synced
    root = str(tmp_path / "ck")
    for i in renames:  # checkpoint.dir synced after each rename, before the next step
        assert ("fsync", root) in events[i + 1:i + 2], events[i:]


# ---- 2. export of a pipeline's native checkpoint ----
def test_a_native_deepspeed_pipe_checkpoint_exports_to_the_portable_form(tmp_path):
    """It used to be refused in one line (no portable form); the pipeline now gathers its stages by GPT name."""
    pytest.importorskip("deepspeed")
    ck = tmp_path / "ck"
    p = run_cli(tmp_path / "run", *FAST, "strategy=deepspeed_pipe", "strategy.zero_stage=0", "train.steps=2",
                "train.global_batch_size=8", "checkpoint.format=native", f"checkpoint.dir={ck}", "checkpoint.every=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (ck / "step_2" / checkpoint.COMPLETE).is_file()
    p = run_cli(tmp_path, str(ck / "step_2"), module="parallelkit.export")
    assert p.returncode == 0, p.stderr[-3000:]
    model, optim = checkpoint.read_portable(ck / "step_2_portable")
    with torch.device("meta"):
        names = {n for n, _ in GPT(GPTConfig(n_layer=2, d_model=64, n_head=4, vocab_size=512, seq_len=64)).named_parameters()}
    assert set(model) == names == set(optim) and all(float(st["step"]) == 2 for st in optim.values())


# ---- 3. NVMe swap folders of dead runs ----
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_nvme_folders_of_dead_runs_are_swept(tmp_path):
    from parallelkit.strategies.deepspeed import zero

    dead, live = tmp_path / "parallelkit_dead", tmp_path / "parallelkit_live"
    for folder, pid in ((dead, _dead_pid()), (live, os.getpid())):
        folder.mkdir()
        (folder / "swap.bin").write_bytes(b"0" * 100)
        zero.claim_nvme_dir(folder, pid)
    other, unmarked = tmp_path / "not_ours", tmp_path / "parallelkit_unmarked"
    other.mkdir()
    unmarked.mkdir()
    assert zero.sweep_stale_nvme(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and other.is_dir() and unmarked.is_dir()


def test_nvme_folder_shared_by_ranks_is_stale_only_when_every_owner_is_dead(tmp_path):
    from parallelkit.strategies.deepspeed import zero

    folder = tmp_path / "parallelkit_run"
    folder.mkdir()
    zero.claim_nvme_dir(folder, _dead_pid())
    zero.claim_nvme_dir(folder, os.getpid())  # the second local rank, still alive
    assert zero.sweep_stale_nvme(tmp_path) == [] and folder.is_dir()


BLOCK = {"sleeping": "time.sleep(60)",  # the main thread runs the handler
         # blocked in C++ with the GIL released, as in a hung collective: the handler would wait for the call
         "in_a_collective": "from datetime import timedelta\nimport torch.distributed as dist\n"
                            "dist.TCPStore('127.0.0.1', 0, 1, True, timeout=timedelta(seconds=60)).get('never')"}


@pytest.mark.parametrize("block", BLOCK, ids=list(BLOCK))
def test_nvme_folder_is_made_claimed_and_removed_on_a_signal(tmp_path, block):
    """A worker stopped by SIGTERM (a timeout, an interrupt) removes its NVMe folder and still ends by the signal,
    at once, even blocked in a collective; a dead run's folder is swept when the new one is made."""
    import time

    from parallelkit.strategies.deepspeed import zero

    stale = tmp_path / "parallelkit_old"
    stale.mkdir()
    zero.claim_nvme_dir(stale, _dead_pid())
    code = (f"import time\n"
            f"from pathlib import Path\n"
            f"from parallelkit.strategies.deepspeed import zero\n"
            f"d = zero.make_nvme_dir(Path({str(tmp_path)!r}), 'run1')\n"
            f"(d / 'swap.bin').write_bytes(b'0' * 100)\n"
            f"print(d, flush=True)\n"
            f"{BLOCK[block]}\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    made = Path(proc.stdout.readline().strip())
    assert made == tmp_path / "parallelkit_run1" and (made / "swap.bin").exists()
    assert not stale.exists()  # swept when the new one was made
    time.sleep(0.5)  # into the blocking call
    t = time.monotonic()
    proc.terminate()
    assert proc.wait(timeout=30) == -15 and time.monotonic() - t < 10  # ended by the signal, as before, at once
    assert not made.exists()


def test_launcher_sweeps_the_nvme_folders_of_a_run_whose_workers_ended(tmp_path):
    from conftest import compose_run

    from parallelkit.strategies.deepspeed import zero

    cfg = compose_run("strategy=zero3", "strategy.offload_param=nvme", f"strategy.nvme_path={tmp_path}", checked=False)
    for name, pid in (("parallelkit_failed_1", _dead_pid()), ("parallelkit_other_2", os.getpid())):
        (tmp_path / name).mkdir()
        zero.claim_nvme_dir(tmp_path / name, pid)
    assert zero.sweep_nvme_of(cfg) == [tmp_path / "parallelkit_failed_1"]
    assert (tmp_path / "parallelkit_other_2").is_dir()


# ---- 4. a DeepSpeed config file that is not JSON ----
@pytest.mark.parametrize("content", [b"\xff" + os.urandom(255), b'{"zero_optimization": {"stage": 2',
                                     b'[1, 2]', "{\"a\": \"\u00e9\"}".encode("latin-1")],
                         ids=["binary", "truncated", "not_an_object", "latin1"])
def test_deepspeed_config_file_that_is_not_json_is_one_line(tmp_path, content):
    """Refused by the plan in one line (the CLI's exit code for it: test_foundation.py's contract test)."""
    pytest.importorskip("deepspeed")
    f = tmp_path / "ds.json"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        compose_plan("strategy=zero2", f"strategy.config_file={f}", "train.steps=2")
    assert str(e.value).startswith("strategy.config_file") and "\n" not in str(e.value), str(e.value)
