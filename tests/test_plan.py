"""One plan of the run, built once per process; one rank map; planning faces without their libraries."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, ROOT, START, compose_run, summary
from omegaconf import OmegaConf, open_dict

from parallelkit.config.plan import planned_strategy


def _count_main(rank: int, run_dir: str) -> None:
    from parallelkit.config.plan import MADE, RunPlan
    from parallelkit.runtime.loop import worker

    MADE["plans"] = 0
    code = worker(RunPlan.load(Path(run_dir)), Path(run_dir))
    Path(run_dir, f"plans_rank{rank}.json").write_text(json.dumps({"plans": MADE["plans"], "code": code}))
    sys.stdout.flush()
    os._exit(0)


def test_the_plan_is_built_once_in_the_launcher_and_loaded_once_per_worker(tmp_path):
    """The launching process: ``run.task`` (checks, pre-flight, predictions, summary, launch) makes one plan; each
    worker: ``RunPlan.load`` once and nothing else makes one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from parallelkit.config.compose import CONF_DIR
    from parallelkit.config.plan import MADE
    from parallelkit.run import task
    from parallelkit.runtime.processes import spawn

    out = tmp_path / "run"
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, "strategy=zero2", "train.steps=3"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        del run_cfg["hydra"]
    MADE["plans"] = 0
    assert task(run_cfg) == "ok"
    assert MADE["plans"] == 1
    assert summary(out)["status"] == "ok" and json.loads((out / "plan.json").read_text())["layout"]["dp"] == 2
    spawn(_count_main, 2, str(out), timeout=300, start_method=START)
    for rank in (0, 1):
        assert json.loads((out / f"plans_rank{rank}.json").read_text()) == {"plans": 1, "code": 0}


def test_the_plan_is_complete_frozen_and_leaves_the_composed_config_alone():
    from hydra import compose, initialize_config_dir

    from parallelkit.config.compose import CONF_DIR
    from parallelkit.runtime.plan import build_plan

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*FAST, "strategy=zero3", "train.global_batch_size=8"])
    before = OmegaConf.to_yaml(cfg)
    plan = build_plan(cfg, quiet=True)
    assert OmegaConf.to_yaml(cfg) == before  # nothing written into what the caller composed
    assert plan.cfg.world_size == 2 and plan.cfg.train.grad_accum == 2  # derived: 8 / (2 x dp 2)
    assert plan.cfg.strategy.zero_init == "auto" and plan.cfg.strategy.offload_param == "none"  # every option
    with pytest.raises(Exception):
        plan.cfg.train.steps = 99  # read-only


def test_the_rank_map_is_megatron_order_and_backends_follow_it():
    from parallelkit.config.layout import Layout

    lay = Layout(world=8, dp=2, tp=2, pp=2, processes=8)
    assert [tuple(lay.coords(r).values()) for r in range(8)] == [  # (pp, dp, cp, tp)
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (0, 1, 0, 1), (1, 0, 0, 0), (1, 0, 0, 1), (1, 1, 0, 0), (1, 1, 0, 1)]
    assert all(lay.rank_of(**lay.coords(r)) == r for r in range(8))
    assert lay.groups("tp") == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert lay.groups("dp") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert lay.groups("pp") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    # DeepSpeed's topology (neox_3d, deepspeed_pipe) orders (pipe, data, model): the same map, checked here as the
    # backend checks it at build time
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    assert all((c.pipe, c.data, c.model) == tuple(lay.coords(r)[a] for a in ("pp", "dp", "tp"))
               for r, c in ((r, topo.get_coord(r)) for r in range(8)))
    # torch_nd's DeviceMesh (pp, dp_replicate, dp_shard, cp, tp), row-major: the same map with dp split and cp in it
    cp = Layout(world=16, dp=2, tp=2, pp=2, cp=2, processes=16)
    assert [cp.rank_of(**cp.coords(r)) for r in range(16)] == list(range(16))
    assert cp.groups("cp") == [(0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 14), (13, 15)]
    assert cp.groups("dp")[0] == (0, 4) and cp.groups("pp")[0] == (0, 8)


def test_planning_faces_import_without_deepspeed_or_fairscale():
    """estimate and the pre-flight read every preset's planning face (options, layout, checks, memory, comm) without
    loading a backend's library."""
    code = """
import sys
from omegaconf import OmegaConf
from parallelkit.config.compose import preset, strategy_presets
from parallelkit.config.plan import strategy_class
import parallelkit.advisor.estimate, parallelkit.advisor.predict
for name in strategy_presets():
    cls = strategy_class(OmegaConf.create({"strategy": preset(name)}))
    cls.options(OmegaConf.create({"strategy": preset(name)}))
print(sorted({m.split(".")[0] for m in sys.modules} & {"deepspeed", "fairscale"}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_every_backend_predicts_or_says_not_predicted():
    """No silent default: memory() and comm() are a prediction or None ("not predicted"), and every shipped preset
    predicts both."""
    from parallelkit.config.compose import strategy_presets
    from parallelkit.strategies.base import Strategy

    assert Strategy.memory(None, None, None, None) is None and Strategy.comm(None, None, None) is None
    for name in strategy_presets():  # the planning face alone (no machine checks: GPU- or libaio-only presets too)
        cfg = compose_run(f"strategy={name}", f"world_size={ {'neox_3d': 4, 'torch_nd_3d': 8}.get(name, 2)}",
                          "train.grad_accum=2", checked=False)
        cls, opts, lay = planned_strategy(cfg)
        assert cls.memory(cfg, opts, lay, None) is not None, name
        assert cls.comm(cfg, opts, lay) is not None, name
