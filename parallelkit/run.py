"""``python -m parallelkit.run [overrides]``: check the config, launch the workers, write the result.

Under an existing launcher (torchrun sets RANK and WORLD_SIZE) it runs as a worker in
place instead, so multi-node jobs go through torchrun's rendezvous.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from parallelkit.advisor.predict import preflight, summary_fields
from parallelkit.config.compose import (
    CONF_DIR,
    check_group_choices,
    check_keys,
    explicit_keys,
    open_strategy_keys,
)
from parallelkit.config.env import adopt_slurm_env, under_torchrun
from parallelkit.config.env import rank as env_rank
from parallelkit.config.errors import ConfigError, DoesNotFit
from parallelkit.config.plan import RunPlan
from parallelkit.config.resume import lock_checkpoint_dir
from parallelkit.measure.results import failed_summary, result_line
from parallelkit.runtime.launch import Interrupted, raise_on_signals
from parallelkit.runtime.plan import build_plan
from parallelkit.util.jsonio import read_json, write_json

CURRENT: dict = {"out": None, "sweep": None}  # the run (and sweep) in progress, for the interrupt path in main()


def task(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    CURRENT.update(out=out, sweep=Path(hc.sweep.dir) if multirun else None)
    lock, plan = None, None
    try:
        # the keys this run (a sweep: this job) set on the command line, and those its strategy preset sets;
        # a backend's own config (a user's DeepSpeed JSON) fills the rest
        plan = build_plan(cfg, explicit=explicit_keys(hc.overrides.task, hc.runtime.choices.get("strategy")))
        if env_rank() == 0:  # a checkpoint.dir in use by another live run is refused
            lock = lock_checkpoint_dir(plan.cfg, out)
            plan.save(out)  # config.yaml and plan.json: what each worker loads, kept with the run
        prediction = preflight(plan)  # DoesNotFit when the predicted memory per rank clearly exceeds a rank's
    except ConfigError as e:  # DoesNotFit included
        if lock is not None:
            lock.release()
        return refused(e, cfg, plan, out, multirun)
    try:
        return _run(plan, out, multirun, prediction)
    finally:
        if lock is not None:
            lock.release()


def refused(e: ConfigError, cfg: DictConfig, plan: RunPlan | None, out: Path, multirun: bool) -> str:
    """A run refused before any worker starts: its summary says why (``skipped`` when pre-flight predicts it
    does not fit, ``failed`` for a config error), one line on stderr, exit 2 (a sweep goes on)."""
    fit = isinstance(e, DoesNotFit)
    why = f"pre-flight: {e}" if fit else f"config error: {e}"
    summary = {**failed_summary(cfg, why, plan), "status": "skipped" if fit else "failed"}
    write_json(out / "summary.json", summary)
    print(f"parallelkit: {why}" + ("; the sweep goes on" if multirun and fit else ""), file=sys.stderr)
    if multirun:
        return "skipped" if fit else "failed"
    sys.exit(2)


def predictions(plan: RunPlan, prediction: dict | None) -> dict:
    """The predictions written beside the measurements: made once, by rank 0 (under torchrun every rank plans;
    a projection may benchmark collectives, which one process does for all), with this machine's training rates
    measured again where they are older than a few minutes (not under torchrun: no second set of processes)."""
    if env_rank() != 0:
        return {}
    if not os.environ.get("PARALLELKIT_NO_PREDICTION") and not under_torchrun():
        from parallelkit.advisor.projection import refresh_plan_rates

        refresh_plan_rates(plan)
    return summary_fields(plan, prediction)


def _run(plan: RunPlan, out: Path, multirun: bool, prediction: dict | None = None) -> str:
    predicted = predictions(plan, prediction)
    if under_torchrun():  # we are one worker of the user's torchrun job
        from parallelkit.runtime.loop import worker

        code = worker(plan, out)
        if env_rank() == 0:
            with contextlib.suppress(Exception):  # what a dead worker's backend left behind (NVMe swap)
                plan.cls.after_run(plan.cfg)
        if env_rank() == 0 and (out / "summary.json").exists():
            write_json(out / "summary.json", {**read_json(out / "summary.json"), **predicted})
            print(result_line(read_json(out / "summary.json"), out), flush=True)
        if code:
            sys.exit(code)
        return "ok"

    from parallelkit.runtime.launch import launch

    print(f"parallelkit: {plan.label} on {plan.layout.processes} process(es), model {plan.cfg.model.name} "
          f"({plan.model.num_params():,} params), {plan.cfg.train.steps} steps -> {out}", file=sys.stderr, flush=True)
    summary = launch(plan, out, predicted)
    print(result_line(summary, out), flush=True)
    if summary["status"] != "ok" and not multirun:
        print(f"parallelkit: {summary['status']}: {summary['error']}", file=sys.stderr)
        sys.exit(1)
    return summary["status"]


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> str:
    return task(cfg)


def main() -> None:
    adopt_slurm_env()
    sys.argv[1:] = open_strategy_keys(sys.argv[1:])
    if (err := check_group_choices(sys.argv[1:]) or check_keys(sys.argv[1:])) is not None:
        print(f"parallelkit: config error: {err}", file=sys.stderr)
        sys.exit(2)
    if {"-m", "--multirun"} & set(sys.argv):  # sweeps: each configuration once; repeats=N interleaved (sweep.py)
        from parallelkit.config.sweep import distinct_strategies, interleave_repeats

        sys.argv[1:] = interleave_repeats(distinct_strategies(sys.argv[1:]))
        if not os.environ.get("PARALLELKIT_NO_PREDICTION") and not under_torchrun():
            from parallelkit.advisor.framework import prefetch, sweep_configs
            from parallelkit.advisor.projection import project_plan, refresh_rates

            try:
                cfgs = sweep_configs(sys.argv[1:])
                refresh_rates(cfgs)  # the jobs' projections use training rates measured beside the sweep
                prefetch(cfgs, project_plan)  # and their framework times: one start-up for them all
            except KeyboardInterrupt:
                print("parallelkit: interrupted while measuring the sweep's calibrations, before its first job: "
                      "nothing was run or written", file=sys.stderr)
                sys.exit(130)
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
        from parallelkit.report.compare import write_report

        try:
            write_report(CURRENT["sweep"])
        except Exception as err:  # noqa: BLE001 - the summaries are written; say why the report is not
            print(f"parallelkit.report: could not write the report: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
