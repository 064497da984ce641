"""``python -m parallelkit.run [overrides]``: check the config, launch the workers, write the result.

Under an existing launcher (torchrun sets RANK and WORLD_SIZE) it runs as a worker in
place instead, so multi-node jobs go through torchrun's rendezvous.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, adopt_slurm_env, explicit_keys, plan, resolve, under_torchrun
from .launch import Interrupted, raise_on_signals
from .predict import DoesNotFit, preflight, summary_fields
from .jsonio import read_json, write_json
from .results import base_summary
from .resume import lock_checkpoint_dir

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
CURRENT: dict = {"out": None, "sweep": None}  # the run (and sweep) in progress, for the interrupt path in main()


def _failed_summary(cfg, error: str) -> dict:
    """A summary for a run that never started: as many known fields as the config allows."""
    try:
        s = base_summary(cfg).to_dict()
    except Exception:  # noqa: BLE001 - the config itself may be what is broken
        s = {"strategy": OmegaConf.select(cfg, "strategy.name"), "label": OmegaConf.select(cfg, "strategy.name"),
             "model": OmegaConf.select(cfg, "model.name"), "losses": []}
    s.update(status="failed", error=error)
    return s


def result_line(s: dict, where: Path) -> str:
    if s["status"] != "ok":
        return f"{s.get('label')}: {s['status']}: {s.get('error')}  ({where})"
    mem = max(s["peak_mem_bytes"]) / 2**20
    mfu = f", MFU {s['mfu']:.1%}" if s.get("mfu") else ""
    return (f"{s['label']}: ok, {s['tokens_per_s']:,.0f} tokens/s{mfu}, step {s['step_time_s'] * 1e3:.1f} ms, "
            f"peak mem {mem:,.0f} MiB/rank, final loss {s['final_loss']:.4f}  ({where})")


def task(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    CURRENT.update(out=out, sweep=Path(hc.sweep.dir) if multirun else None)
    lock = None
    try:
        # the keys this run (a sweep: this job) set on the command line, and those its strategy preset sets;
        # a backend's own config (a user's DeepSpeed JSON) fills the rest
        resolve(cfg, explicit=explicit_keys(hc.overrides.task, hc.runtime.choices.get("strategy")))
        if int(os.environ.get("RANK", "0")) == 0:  # a checkpoint.dir in use by another live run is refused
            lock = lock_checkpoint_dir(cfg, out)
        prediction = preflight(cfg)  # DoesNotFit when the predicted memory per rank clearly exceeds a rank's
    except DoesNotFit as e:
        if lock is not None:
            lock.release()
        write_json(out / "summary.json", {**_failed_summary(cfg, f"pre-flight: {e}"), "status": "skipped"})
        print(f"parallelkit: pre-flight: {e}" + ("; the sweep goes on" if multirun else ""), file=sys.stderr)
        if multirun:
            return "skipped"
        sys.exit(2)
    except ConfigError as e:
        if lock is not None:
            lock.release()
        write_json(out / "summary.json", _failed_summary(cfg, f"config error: {e}"))
        print(f"parallelkit: config error: {e}", file=sys.stderr)
        if multirun:
            return "failed"
        sys.exit(2)
    try:
        return _run(cfg, out, multirun, prediction)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: DictConfig, out: Path, multirun: bool, prediction: dict | None = None) -> str:
    predicted = summary_fields(cfg, prediction)
    if under_torchrun():  # we are one worker of the user's torchrun job
        from .train import worker

        if int(os.environ.get("RANK", "0")) == 0:
            OmegaConf.save(cfg, out / "config.yaml", resolve=True)
        code = worker(cfg, out)
        if int(os.environ.get("RANK", "0")) == 0 and (out / "summary.json").exists():
            write_json(out / "summary.json", {**read_json(out / "summary.json"), **predicted})
            print(result_line(read_json(out / "summary.json"), out), flush=True)
        if code:
            sys.exit(code)
        return "ok"

    from .launch import launch

    layout = plan(cfg)[2]
    base = base_summary(cfg)
    print(f"parallelkit: {base.label} on {layout.processes} process(es), model {cfg.model.name} "
          f"({base.params:,} params), {cfg.train.steps} steps -> {out}", file=sys.stderr, flush=True)
    summary = launch(cfg, out, layout.processes, {**base.to_dict(), **predicted})
    print(result_line(summary, out), flush=True)
    if summary["status"] != "ok" and not multirun:
        print(f"parallelkit: {summary['status']}: {summary['error']}", file=sys.stderr)
        sys.exit(1)
    return summary["status"]


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> str:
    return task(cfg)


def check_group_choices(argv: list[str]) -> str | None:
    """One line for an unknown config-group option (Hydra's own message is a page long)."""
    conf = Path(CONF_DIR)
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or "." in key or "/" in key or not (conf / key).is_dir() or value in ("", "null"):
            continue
        options = sorted(p.stem for p in (conf / key).glob("*.yaml"))
        values = [] if value.startswith(("glob(", "choice(", "range(", "${")) else value.split(",")
        for v in values:
            if v not in options:
                return f"{key}={v}: no such {key}; choose one of {', '.join(options)}"
    return None


def check_keys(argv: list[str]) -> str | None:
    """One line for an override of a key that does not exist (a typo such as train.stepz=5).

    Only for single runs: a sweep's jobs may compose different strategy presets.
    """
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    overrides = [a for a in argv if "=" in a and not a.startswith(("hydra.", "hydra/", "-"))]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose("config", overrides=overrides)
    except ConfigCompositionException as e:
        text = str(e.__cause__ or e)
        if "not in struct" not in text:
            return None
        key = next((a.split("=", 1)[0] for a in overrides if f"'{a.split('=', 1)[0]}'" in str(e)), None)
        if key is None:
            return None
        return f"{key}: no such key; to add a new one write +{key}=..., or see conf/ for the keys of each group"
    except Exception:  # noqa: BLE001 - anything else: Hydra reports it as usual
        return None
    return None


def open_strategy_keys(argv: list[str]) -> list[str]:
    """``strategy.KEY=V`` -> ``++strategy.KEY=V``. A backend's options and their defaults live in its schema
    (``Options`` in its file), not in its YAML, so Hydra must be let to add them; the schema then refuses a
    wrong type or an unknown option in one line (``Strategy.options``)."""
    return [f"++{a}" if re.match(r"strategy\.[\w.]+=", a) else a for a in argv]


def main() -> None:
    adopt_slurm_env()
    sys.argv[1:] = open_strategy_keys(sys.argv[1:])
    if (err := check_group_choices(sys.argv[1:]) or check_keys(sys.argv[1:])) is not None:
        print(f"parallelkit: config error: {err}", file=sys.stderr)
        sys.exit(2)
    if {"-m", "--multirun"} & set(sys.argv):  # sweeps: each configuration once; repeats=N interleaved (sweep.py)
        from .sweep import distinct_strategies, interleave_repeats

        sys.argv[1:] = interleave_repeats(distinct_strategies(sys.argv[1:]))
    if under_torchrun() and int(os.environ.get("RANK", "0")) != 0:
        # Only rank 0 writes results; the other ranks keep Hydra from writing a second .hydra/.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if not under_torchrun():  # under torchrun its agent owns the signals
        raise_on_signals()
    try:
        _hydra_main()
    except Interrupted as e:
        interrupted(e)


def interrupted(e: Interrupted) -> None:
    """The run's processes are gone and its summary says ``interrupted``; a sweep still gets the report of the
    jobs it ran. Exit 128 + the signal's number, as a shell does."""
    where = CURRENT["sweep"] or CURRENT["out"]
    print(f"parallelkit: interrupted: {e.name}; every worker stopped" + (f"; results in {where}" if where else ""),
          file=sys.stderr, flush=True)
    if CURRENT["sweep"] is not None:
        from .report import write_report

        try:
            write_report(CURRENT["sweep"])
        except Exception as err:  # noqa: BLE001 - the summaries are written; say why the report is not
            print(f"parallelkit.report: could not write the report: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
