"""Checkpoints in ``checkpoint.dir/step_N``: written atomically, portable across strategies by default.

A save writes into ``step_N.incomplete``; when every rank has written its part, rank 0 adds
``meta.json``, syncs the files, then writes and syncs the ``complete`` marker and renames the
folder to ``step_N`` (an earlier ``step_N`` is renamed aside to ``.step_N.replaced`` first and
removed after; checkpoint.dir is synced after each rename). A folder without the marker is
never loaded, so a run killed mid-save leaves an ``.incomplete`` folder that is refused by name,
and the previous ``step_N`` still resumes: killed between the two renames, it is renamed back
by the next reader (``recover``, called by ``complete_steps``).

The portable form (``checkpoint.format=portable``, the default), the same whatever the strategy:

* ``model.safetensors``: full fp32 weights under the single-process GPT's parameter names
  (``GPT.named_parameters()``; a tied output projection once, as ``embed.tok.weight``);
* ``optim.safetensors``: AdamW's state beside them, ``NAME/exp_avg``, ``NAME/exp_avg_sq``, ``NAME/step``;
* ``meta.json``: the step, the schedule (``optim.*`` and ``train.steps``), the data position
  (the step: the sampler is a pure function of (seed, sample index), so the step is all of it),
  every rank's RNG state, the layout and the whole config.

``checkpoint.format=native`` keeps the backend's own files (each rank writes its shards, no
gather to rank 0: the form that fits when a model's full state does not fit on one rank). Only
the same strategy and layout resume from it; ``python -m parallelkit.export`` converts it.
"""
from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from parallelkit.config.resume import COMPLETE, INCOMPLETE, NATIVE, PORTABLE, REPLACED, sync_path  # the folders' names
from parallelkit.measure.collective import barrier, gather_named
from parallelkit.measure.host import versions
from parallelkit.util.jsonio import read_json, write_json


# ---- the portable files ----
def write_portable(path: Path, model: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    flat = {f"{name}/{k}": v.contiguous() for name, st in optim.items() for k, v in st.items()}
    save_file({k: v.contiguous() for k, v in model.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    save_file(flat, str(path / "optim.safetensors"), metadata={"format": "pt"})


def read_portable(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    model = load_file(str(path / "model.safetensors"))
    optim: dict[str, dict[str, torch.Tensor]] = {}
    if (path / "optim.safetensors").exists():
        for key, v in load_file(str(path / "optim.safetensors")).items():
            name, _, k = key.rpartition("/")
            optim.setdefault(name, {})[k] = v
    return model, optim


# ---- RNG: the loop draws nothing at random (data is a function of (seed, index)); kept for models that do ----
def rng_state(device: torch.device) -> dict[str, str | None]:
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    cuda = enc(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    return {"torch": enc(torch.get_rng_state()), "cuda": cuda}


def set_rng_state(state: dict, device: torch.device) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["torch"]))
    if device.type == "cuda" and state.get("cuda"):
        torch.cuda.set_rng_state(dec(state["cuda"]), device)


# ---- save / load, called by every rank ----
def meta_for(strategy, cfg, step: int, fmt: str, rng: list[dict]) -> dict:
    t, lay = cfg.train, strategy.ctx.layout
    g = t.micro_batch_size * t.grad_accum * lay.data_ranks
    options = {k: v for k, v in OmegaConf.to_container(cfg.strategy, resolve=True).items() if k not in ("name", "_target_")}
    return {"format": fmt, "step": step, "strategy": cfg.strategy.name, "strategy_target": cfg.strategy._target_,
            "strategy_options": options, "layout": lay.as_dict(),
            "schedule": {"train_steps": t.steps, "optim": OmegaConf.to_container(cfg.optim, resolve=True)},
            "data": {"step": step, "samples_seen": step * g, "global_batch": g, "seed": cfg.seed,
                     "data": OmegaConf.to_container(cfg.data, resolve=True)},
            "model": OmegaConf.to_container(cfg.model, resolve=True), "precision": t.precision, "rng": rng,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
            "config": OmegaConf.to_container(cfg, resolve=True)}


def save(strategy, cfg, step: int) -> Path:
    """Write ``checkpoint.dir/step_N`` (collective). Returns the final folder."""
    root = Path(cfg.checkpoint.dir)
    final, tmp = root / f"step_{step}", root / f"step_{step}{INCOMPLETE}"
    rank0, fmt = strategy.ctx.rank == 0, cfg.checkpoint.get("format", PORTABLE)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous run's half-written attempt at this step
        tmp.mkdir(parents=True)
    barrier()
    if fmt == NATIVE:
        strategy.save(tmp)
    else:
        state = strategy.export_state()
        if rank0:
            write_portable(tmp, *state)
    rng = [r["rng"] for r in gather_named({"rng": rng_state(strategy.ctx.device)})]
    barrier()  # every rank's part is on disk
    if rank0:
        write_json(tmp / "meta.json", meta_for(strategy, cfg, step, fmt, rng))
        _sync(tmp)  # the data on disk first: the marker must never reach the disk before what it vouches for
        marker = tmp / COMPLETE
        marker.write_text(f"step {step} written by every rank\n")
        sync_path(marker)
        sync_path(tmp)
        _replace(tmp, final)
    barrier()
    return final


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an earlier run's ``final`` is renamed aside first (``.step_N.replaced``) and
    removed after, so a step is replaced whole, never mixed. A crash between the two renames leaves the old one
    complete under its aside name, which the readers (``recover``) rename back."""
    root, old = final.parent, _aside(final)
    for attempt in range(3):
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            sync_path(root)
        try:
            tmp.rename(final)
            break
        except OSError:  # a reader renamed the old one back in between: aside again
            if attempt == 2 or not final.exists():
                raise
    sync_path(root)
    (old / COMPLETE).unlink(missing_ok=True)  # the old one never counts again, even half removed
    shutil.rmtree(old, ignore_errors=True)


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}{REPLACED}")


def _sync(folder: Path) -> None:
    """Flush the files below ``folder`` and the folders that hold them."""
    for p in sorted(folder.rglob("*"), key=lambda q: q.is_dir()):  # files, then their folders
        sync_path(p)
    sync_path(folder)


def load(strategy, path: Path) -> int:
    """Load a complete checkpoint folder into the strategy (collective); return its step."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") == NATIVE:
        strategy.load(path)
    else:
        strategy.import_state(*read_portable(path))
    rng = meta.get("rng") or []
    if rng:
        set_rng_state(rng[strategy.ctx.rank % len(rng)], strategy.ctx.device)
    return int(meta["step"])


def read_meta(path: Path) -> dict:
    if not (Path(path) / COMPLETE).is_file():
        raise ValueError(f"{path} is an incomplete checkpoint (no '{COMPLETE}' marker)")
    return read_json(Path(path) / "meta.json")


# ---- finding checkpoints ----
