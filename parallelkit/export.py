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
import socket
import sys
from pathlib import Path

from .checkpoint import COMPLETE, INCOMPLETE, NATIVE, PORTABLE, read_meta, write_portable
from .config import ConfigError
from .resume import resolve_resume
from .jsonio import write_json


def find_checkpoint(src: Path) -> Path:
    """The complete step folder that ``src`` names (see the module docstring)."""
    if (src / "config.yaml").is_file() and not (src / COMPLETE).exists() and not (src / "meta.json").exists():
        import yaml

        ck = (yaml.safe_load((src / "config.yaml").read_text()) or {}).get("checkpoint") or {}
        if not ck.get("dir"):
            raise ConfigError(f"{src} is a run folder without checkpoint.dir: nothing to export")
        return resolve_resume("latest", ck["dir"])
    return resolve_resume(str(src), None)


def _rank_main(rank: int, world: int, port: int, src: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from .config import plan
    from .train import init_distributed, make_strategy

    meta = read_meta(Path(src))
    cfg = OmegaConf.create(meta["config"])
    cfg.checkpoint.update(dir=None, every=0, resume=None)
    strategy = make_strategy(cfg, init_distributed(plan(cfg)[2]), None)
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


def export(src: Path, out: Path | None = None) -> Path:
    path = find_checkpoint(Path(src))
    meta = read_meta(path)
    out = Path(out) if out else path.with_name(f"{path.name}_portable")
    if out.exists():
        raise ConfigError(f"{out} exists: give another output folder")
    if meta.get("format", PORTABLE) != NATIVE:
        shutil.copytree(path, out)  # already portable: a copy, so OUT is always a folder of its own
        return out
    from omegaconf import OmegaConf
    import torch.multiprocessing as mp

    from .config import plan

    nproc = plan(OmegaConf.create(meta["config"]))[2].processes
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(nproc, port, str(path), str(out)), nprocs=nproc, join=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parallelkit.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a step_N folder, a checkpoint.dir, or a run folder")
    ap.add_argument("out", type=Path, nargs="?", help="where to write the portable checkpoint")
    args = ap.parse_args(argv)
    try:
        out = export(args.src, args.out)
    except ConfigError as e:
        print(f"parallelkit.export: {e}", file=sys.stderr)
        sys.exit(2)
    meta = json.loads((out / "meta.json").read_text())
    print(f"parallelkit.export: step {meta['step']} of a {meta.get('strategy')} run -> {out} "
          f"(resume with checkpoint.resume={out})")


if __name__ == "__main__":
    main()
