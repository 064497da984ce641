"""``python -m parallelkit.export RUN_OR_CHECKPOINT [OUT]``: the portable form of a checkpoint.

RUN_OR_CHECKPOINT is a ``step_N`` folder, a ``checkpoint.dir`` (its newest complete step) or a
run's output folder (the newest complete step of its ``checkpoint.dir``). A native checkpoint
(``checkpoint.format=native``: DeepSpeed's, torch.distributed.checkpoint's, ...) is loaded by
the strategy that wrote it, on the same layout (its processes are started here, on gloo and
the CPU unless CUDA is present), and written back through that strategy's ``export_state``:
weights and AdamW moments under the single-process names, and the JSON of step, schedule, RNG
and data position. Every strategy resumes from the result (``checkpoint.resume=OUT``).
OUT defaults to ``<step_N>_portable`` beside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from parallelkit.checkpoint.format import read_meta, write_portable
from parallelkit.config.errors import ConfigError
from parallelkit.config.resume import COMPLETE, INCOMPLETE, NATIVE, PORTABLE, recover, resolve_resume
from parallelkit.runtime.processes import spawn
from parallelkit.util.jsonio import write_json


def find_checkpoint(src: Path) -> Path:
    """The complete step folder that ``src`` names (see the module docstring)."""
    if (src / "config.yaml").is_file() and not (src / COMPLETE).exists() and not (src / "meta.json").exists():
        import yaml

        ck = (yaml.safe_load((src / "config.yaml").read_text()) or {}).get("checkpoint") or {}
        if not ck.get("dir"):
            raise ConfigError(f"{src} is a run folder without checkpoint.dir: nothing to export")
        return resolve_resume("latest", ck["dir"])
    if not src.exists():  # a step_N that a save killed between its two renames left aside: put back
        recover(src.parent)
    return resolve_resume(str(src), None)


def _rank_main(rank: int, src: str, out: str) -> None:
    import torch.distributed as dist

    from parallelkit.runtime.loop import init_distributed, make_strategy

    meta = read_meta(Path(src))
    plan = _plan_of(meta)
    strategy = make_strategy(plan, init_distributed(plan.layout), None)
    strategy.load(Path(src))
    state = strategy.export_state()
    if rank == 0:
        tmp = Path(out + INCOMPLETE)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_portable(tmp, *state)
        write_json(tmp / "meta.json", {**meta, "format": PORTABLE, "exported_from": src})
        (tmp / COMPLETE).write_text(f"step {meta['step']} exported from {src}\n")
        tmp.rename(out)
    strategy.teardown()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _plan_of(meta: dict):
    """The plan of the run that wrote a checkpoint (its saved config), with nothing to save or resume."""
    from omegaconf import OmegaConf

    from parallelkit.config.plan import RunPlan

    cfg = OmegaConf.create(meta["config"])
    cfg.checkpoint.update(dir=None, every=0, resume=None)
    return RunPlan.of(cfg)


def export(src: Path, out: Path | None = None) -> Path:
    path = find_checkpoint(Path(src))
    meta = read_meta(path)
    out = Path(out) if out else path.with_name(f"{path.name}_portable")
    if out.exists():
        raise ConfigError(f"{out} exists: give another output folder")
    if meta.get("format", PORTABLE) != NATIVE:
        shutil.copytree(path, out)  # already portable: a copy, so OUT is always a folder of its own
        return out
    plan = _plan_of(meta)
    if not plan.cls.portable:
        raise ConfigError(f"{path} is a native {meta.get('strategy')} checkpoint, and {meta.get('strategy')} has no "
                          f"portable form yet: resume it under the same strategy, options and layout")
    spawn(_rank_main, plan.layout.processes, str(path), str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parallelkit.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a step_N folder, a checkpoint.dir, or a run folder")
    ap.add_argument("out", type=Path, nargs="?", help="where to write the portable checkpoint")
    args = ap.parse_args(argv)
    try:
        out = export(args.src, args.out)
    except ConfigError as e:  # one line, nothing written
        print(f"parallelkit: {e}", file=sys.stderr)
        sys.exit(2)
    meta = json.loads((out / "meta.json").read_text())
    print(f"parallelkit.export: step {meta['step']} of a {meta.get('strategy')} run -> {out} "
          f"(resume with checkpoint.resume={out})")


if __name__ == "__main__":
    main()
