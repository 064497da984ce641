"""Build the plan of a run: once, in the launching process, before any worker starts.

The one place where the run config is written to: a private copy gets the values that depend on the
machine (world_size), what a backend adopts from its own config (a user's DeepSpeed JSON), the derived
values (grad_accum from a global batch, the step folder a resume names, the untimed steps it leaves) and
every option's default; then it is frozen. Everything else only checks: each check returns notes or
raises a one-line ``ConfigError``.
"""
from __future__ import annotations

import copy
import sys

from omegaconf import DictConfig, OmegaConf, open_dict

from parallelkit.config.checks import (
    check_family,
    check_inputs,
    check_settings,
    check_world,
    default_world_size,
    grad_accum_of,
    hf_model_values,
    note,
    untimed_steps_key,
)
from parallelkit.config.env import rank as env_rank
from parallelkit.config.plan import MADE, RunPlan, options_dict, strategy_class
from parallelkit.config.resume import checkpoint_plan


def build_plan(cfg: DictConfig, explicit: set[str] | None = None, quiet: bool = False) -> RunPlan:
    """The checked, complete and frozen plan of ``cfg`` (a composed config, which is not changed).

    ``explicit``: the keys the command line set; a backend fills the others from its own config
    (``Strategy.prepare``). ``quiet``: no notes on stderr (planning alternatives, not the run)."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    notes: list[str] = []
    with open_dict(cfg):
        cfg.pop("hydra", None)
        old, why = untimed_steps_key(cfg)
        if old is not None:
            cfg.train.untimed_steps, cfg.train.warmup_steps = old, None
            notes.append(why)
        if cfg.model.get("arch") == "hf":  # a Hugging Face model: its shape comes from its config.json
            cfg.model.update(hf_model_values(cfg))
        if cfg.world_size is None:
            cfg.world_size = default_world_size()
        cls = strategy_class(cfg)
        adopted = cls.prepare(cfg, explicit or set()) or []  # settings taken from the backend's own config
        check_settings(cfg)
        check_family(cfg, cls)  # a strategy that cuts the model knows the GPT's layout only
        opts = cls.options(cfg)
        layout = cls.layout(cfg, opts)
        if (accum := grad_accum_of(cfg, layout.data_ranks)) is not None:
            cfg.train.grad_accum = accum
        updates, more = checkpoint_plan(cfg, cls.portable)
        for key, value in updates.items():
            OmegaConf.update(cfg, key, value)
        notes += more
        cls.check(cfg, opts)
        check_world(cfg, layout.processes, cls.one_process)
        cfg.strategy.update(options_dict(opts))  # the saved config is complete: every option, defaults included
        cfg.strategy.name = opts.name
        check_inputs(cfg)  # the data files, the device named: last, once the settings are sound
    OmegaConf.set_readonly(cfg, True)
    if not quiet:
        if adopted and env_rank() == 0:
            print(f"parallelkit: {'; '.join(adopted)}", file=sys.stderr, flush=True)
        for text in notes:
            note(text)
    MADE["plans"] += 1
    return RunPlan(cfg, cls, opts, layout, tuple(adopted + notes))
