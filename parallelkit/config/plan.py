"""The plan of a run: one frozen record of what will run, built once and handed to everything downstream.

``RunPlan`` holds the complete run config (read-only: every default, derived value and setting adopted
from a backend's own config already in it), the strategy class, its typed options and the layout with
its rank map. The launching process builds it (``runtime.plan.build_plan``: the checks run there) and
saves it with the run (``config.yaml``, ``plan.json``); each worker loads it once (``RunPlan.load``) and
runs no check again.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from parallelkit.config.errors import ConfigError
from parallelkit.config.layout import Layout
from parallelkit.models.gpt import GPTConfig

MADE = {"plans": 0}  # plans built (runtime.plan.build_plan) or loaded (RunPlan.load) here: a test counts one a run


def strategy_class(cfg):
    """The class named by ``strategy._target_`` (importing it needs torch, not the backend's library)."""
    from hydra.utils import get_class

    target = OmegaConf.select(cfg, "strategy._target_")
    try:
        return get_class(target)
    except Exception as e:  # noqa: BLE001 - turned into one line for the user
        raise ConfigError(f"strategy._target_={target!r} cannot be imported ({type(e).__name__}: {e}); "
                          f"is its backend installed? (bash scripts/setup.sh)") from None


def planned_strategy(cfg):
    """(strategy class, typed options, layout) of a config, without making a plan (for the checks that build one)."""
    klass = strategy_class(cfg)
    opts = klass.options(cfg)
    return klass, opts, klass.layout(cfg, opts)


def options_dict(opts) -> dict:
    """Typed options as the complete ``strategy.*`` mapping a plan's config holds (less the preset's name)."""
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "name"}


@dataclass(frozen=True)
class RunPlan:
    cfg: DictConfig  # the complete run config, read-only
    cls: type  # the strategy class (its planning face: options, layout, check, label, memory, comm)
    opts: Any  # its typed options
    layout: Layout
    notes: tuple[str, ...] = field(default=())  # what planning adopted or changed, said once

    @classmethod
    def of(cls, cfg) -> "RunPlan":
        """The plan of a complete config (one ``build_plan`` made, or a saved run's): no checks, no changes."""
        return cls(cfg, *planned_strategy(cfg))

    @property
    def label(self) -> str:
        return self.cls.label(self.cfg, self.opts)

    @functools.cached_property
    def model(self):
        """The model's shape (GPTConfig, LlamaConfig or HFShape): parameters by part, FLOPs per token."""
        return GPTConfig.from_cfg(self.cfg.model)

    def save(self, run_dir: Path) -> None:
        """``config.yaml`` (the complete config the workers read) and ``plan.json`` (layout, rank map, notes)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, run_dir / "config.yaml", resolve=True)
        facts = {"strategy": self.cfg.strategy.name, "class": f"{self.cls.__module__}.{self.cls.__qualname__}",
                 "label": self.label, "layout": self.layout.as_dict(), "mesh": self.layout.mesh_description(),
                 "notes": list(self.notes)}
        (run_dir / "plan.json").write_text(json.dumps(facts, indent=1) + "\n")

    @classmethod
    def load(cls, run_dir: Path) -> "RunPlan":
        """The plan a launcher saved in ``run_dir``: read once by each worker."""
        cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
        OmegaConf.set_readonly(cfg, True)
        MADE["plans"] += 1
        return cls.of(cfg)
