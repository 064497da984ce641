"""The checkpoint settings, checked before any worker starts: the step folders they name, the one a resume
loads, and the lock on a checkpoint.dir in use (checkpoint/format.py writes and reads what is in the folders).

``checkpoint.resume`` takes a ``step_N`` folder, a ``checkpoint.dir`` (its newest complete
checkpoint) or ``latest`` (the newest in this run's ``checkpoint.dir``); it is resolved here
to one complete step folder, written back into the config the workers read.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import time
from pathlib import Path

from omegaconf import OmegaConf

from parallelkit.config.checks import note
from parallelkit.config.errors import ConfigError
from parallelkit.config.plan import options_dict, planned_strategy, strategy_class

PORTABLE, NATIVE = "portable", "native"
FORMATS = (PORTABLE, NATIVE)
COMPLETE = "complete"  # the marker: present only once every rank's part and meta.json are written
STEP = re.compile(r"step_(\d+)$")
INCOMPLETE = ".incomplete"
REPLACED = ".replaced"  # .step_N.replaced: an earlier step_N while save() puts the new one in its place
ASIDE = re.compile(r"\.step_(\d+)\.replaced$")


# ---- the step folders ----
def sync_path(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover(root: Path) -> list[Path]:
    """Rename back every complete ``.step_N.replaced`` whose ``step_N`` is missing: what a save killed between its
    two renames leaves (the earlier step_N aside, the new one still ``.incomplete``). Returns the steps put back."""
    root, back = Path(root), []
    if not root.is_dir():
        return back
    for p in root.iterdir():
        m = ASIDE.match(p.name)
        if m and (p / COMPLETE).is_file() and not (final := root / f"step_{m.group(1)}").exists():
            try:
                p.rename(final)
            except OSError:  # a read-only checkpoint.dir, or another reader was first: complete_steps reads it aside
                continue
            sync_path(root)
            back.append(final)
    return back


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    """The complete ``step_N`` folders under ``root``, oldest first (a step_N left aside by a killed save is put
    back first, or listed under its aside name where it cannot be)."""
    root = Path(root)
    if not root.is_dir():
        return []
    recover(root)
    found = {int(m.group(1)): p for p in root.iterdir() if (m := STEP.match(p.name)) and (p / COMPLETE).is_file()}
    for p in root.iterdir():
        if (m := ASIDE.match(p.name)) and (p / COMPLETE).is_file():
            found.setdefault(int(m.group(1)), p)
    return sorted(found.items())


def incomplete_steps(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and
                  (p.name.endswith(INCOMPLETE) or (STEP.match(p.name) and not (p / COMPLETE).exists())))


def last_complete(root: Path) -> str:
    steps = complete_steps(root)
    return f"the last complete one is {steps[-1][1]}" if steps else f"{root} holds no complete checkpoint"


# ---- the plan of a resume ----
MODEL_KEYS = ("n_layer", "n_head", "d_model", "vocab_size", "seq_len", "tie_weights")


def _class_of(target: str | None):
    try:
        return strategy_class(OmegaConf.create({"strategy": {"_target_": target}}))
    except ConfigError:
        return target


def checkpoint_plan(cfg, portable: bool) -> tuple[dict, list[str]]:
    """checkpoint.* and what a resume implies: ({key: derived value}, notes), or a ConfigError. The values are the
    resolved ``checkpoint.resume`` (one complete step folder) and the untimed steps a resume leaves; ``portable``:
    the strategy writes and reads the portable form."""
    ck = cfg.checkpoint
    every, fmt, d = ck.get("every", 0), ck.get("format", "portable"), ck.get("dir")
    if every is None:
        every = 0
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ConfigError(f"checkpoint.every={every!r}: must be an integer >= 0 (save every N steps; 0: never)")
    if fmt not in FORMATS:
        raise ConfigError(f"checkpoint.format={fmt!r}: choose portable (any strategy resumes from it) or native "
                          f"(the backend's own sharded files)")
    if d is not None and not isinstance(d, str):
        raise ConfigError(f"checkpoint.dir={d!r}: must be a folder path")
    if every and not d:
        raise ConfigError(f"checkpoint.every={every} needs checkpoint.dir=<a folder> to write step_N checkpoints into")
    if d and Path(d).exists() and not Path(d).is_dir():
        raise ConfigError(f"checkpoint.dir={d} is a file: give a folder")
    updates, notes = {}, []
    resume = None
    if ck.get("resume"):
        resume = resolve_resume(str(ck.resume), d)
        updates, notes = check_resume(cfg, resume)
    resumes_portable = resume is not None and json.loads((resume / "meta.json").read_text()).get("format") != NATIVE
    if not portable and ((fmt != NATIVE and d and (every or ck.get("save_final"))) or resumes_portable):
        raise ConfigError(f"strategy={cfg.strategy.name} has no portable checkpoint yet: write checkpoint.format=native "
                          f"and resume under the same strategy")
    return updates, notes


def resolve_resume(resume: str, ckpt_dir: str | None) -> Path:
    """One complete step folder for ``checkpoint.resume``, or a ConfigError naming what is wrong."""
    key = f"checkpoint.resume={resume}"
    if resume == "latest":
        if not ckpt_dir:
            raise ConfigError("checkpoint.resume=latest needs checkpoint.dir=<the folder of step_N checkpoints>")
        steps = complete_steps(Path(ckpt_dir))
        if not steps:
            raise ConfigError(f"{key}: checkpoint.dir={ckpt_dir} holds no complete checkpoint"
                              + _incomplete_hint(Path(ckpt_dir)))
        return steps[-1][1]
    p = Path(resume).expanduser()
    if not p.exists() and STEP.match(p.name) and p.parent.is_dir():
        recover(p.parent)  # a step a crashed save left renamed aside comes back under its name
    if not p.exists():
        partial = p.with_name(p.name + INCOMPLETE)
        if partial.is_dir():
            raise ConfigError(f"{key} was never completed ({partial} is what a run stopped while writing it); "
                              f"{last_complete(p.parent)}")
        raise ConfigError(f"{key} does not exist: give a checkpoint.dir/step_N folder, a checkpoint.dir, or latest")
    if not p.is_dir():
        raise ConfigError(f"{key} is a file, not a checkpoint: give a checkpoint.dir/step_N folder, a checkpoint.dir, "
                          f"or latest")
    if (p / COMPLETE).is_file():
        return p
    if (p / "meta.json").is_file() or p.name.endswith(INCOMPLETE) or STEP.match(p.name):
        raise ConfigError(f"{key} is incomplete (no '{COMPLETE}' marker: the run stopped while writing it); "
                          f"{last_complete(p.parent)}")
    steps = complete_steps(p)
    if steps:
        return steps[-1][1]
    raise ConfigError(f"{key} holds no checkpoint (no complete step_N folder)" + _incomplete_hint(p))


def _incomplete_hint(root: Path) -> str:
    bad = incomplete_steps(root)
    return f"; {', '.join(b.name for b in bad)} incomplete" if bad else ""


def check_resume(cfg, path: Path) -> tuple[dict, list[str]]:
    """Refuse what cannot resume in one line; say what differs from the original run in one note each. Returns
    the derived values ({key: value}: the step folder, the untimed steps left) and the notes."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        step = int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint.resume={path}: unreadable meta.json ({type(e).__name__}: {e})") from None
    model = meta.get("model") or {}
    diff = [f"model.{k}={cfg.model.get(k)} (checkpoint: {model[k]})" for k in MODEL_KEYS
            if k in model and cfg.model.get(k) != model[k]]
    if diff:
        raise ConfigError(f"checkpoint.resume={path} is of another model: {', '.join(diff)}")
    if meta.get("format") == NATIVE:
        _, opts, lay = planned_strategy(cfg)
        lay, mine = lay.as_dict(), json.loads(json.dumps(options_dict(opts), default=str))
        if (_class_of(meta.get("strategy_target")) is not _class_of(cfg.strategy._target_)
                or meta.get("strategy_options") != mine
                or meta.get("layout") != lay):
            raise ConfigError(f"checkpoint.resume={path} is a native {meta.get('strategy')} checkpoint (options "
                              f"{meta.get('strategy_options')}, layout {meta.get('layout')}): resume it under the same "
                              f"strategy, options and layout, or convert it with python -m parallelkit.export {path}")
    steps = cfg.train.steps
    if step >= steps:
        raise ConfigError(f"checkpoint.resume={path} is at step {step} and train.steps={steps} leaves nothing to train: "
                          f"raise train.steps")
    updates, notes = {"checkpoint.resume": str(path)}, []
    left = steps - step
    if cfg.train.untimed_steps >= left:
        notes.append(f"resuming at step {step} leaves {left} step(s), not more than train.untimed_steps="
                     f"{cfg.train.untimed_steps}: the last one is timed (train.untimed_steps={left - 1} for this run)")
        updates["train.untimed_steps"] = left - 1
    schedule = meta.get("schedule") or {}
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    if schedule.get("train_steps", steps) != steps or (schedule.get("optim") not in (None, optim)):
        what = (f"train.steps={steps} (the original run planned {schedule.get('train_steps')})"
                if schedule.get("train_steps", steps) != steps else "optim.* differs from the original run's")
        notes.append(f"resuming at step {step} with {what}: the learning-rate schedule differs from the original run's "
                     f"from step {step} on")
    return updates, notes


# ---- a checkpoint.dir in use by a live run ----
class DirLock:
    """An exclusive ``flock`` on ``checkpoint.dir/.lock``, held by the launching process for the run. The kernel
    drops it when that process dies, so a crashed run never leaves the folder locked."""

    def __init__(self, folder: str | Path):
        self.folder, self.fd = Path(folder), None

    def acquire(self, run_dir: Path | None = None) -> "DirLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"checkpoint.dir={self.folder} is in use by another live run ({holder}): give another "
                              f"checkpoint.dir, or wait for that run to end") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()}, since {time.strftime('%H:%M:%S')}, run dir {run_dir}\n"
                 .encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def lock_checkpoint_dir(cfg, run_dir: Path) -> DirLock | None:
    """Lock ``checkpoint.dir`` for this run; note checkpoints already there from another run."""
    d = OmegaConf.select(cfg, "checkpoint.dir")
    if not d:
        return None
    lock = DirLock(d).acquire(run_dir)
    resume = OmegaConf.select(cfg, "checkpoint.resume")
    old = complete_steps(Path(d))
    if old and not (resume and Path(resume).resolve().parent == Path(d).resolve()):
        note(f"checkpoint.dir={d} already holds {', '.join(p.name for _, p in old[-3:])} from another run; this run "
             f"replaces any of the same step")
    return lock
