"""``repeats=N`` for a sweep: every job N times, all jobs once, then all again.

Back-to-back repeats of one job would see the same moment of the machine; interleaved, a
busy spell lands on different strategies' repeats and the spread across repeats shows it.

Hydra's basic sweeper runs ``itertools.product`` over its sweep parameters, so the first
parameter varies slowest; it takes the config's ``hydra.sweeper.params`` (an experiment's)
first, then the command line's, each key at its first appearance. So ``+repeat=0,..,N-1``
must come before both: we rewrite the command line to ``+repeat=...``, then the
experiment's parameters, then the user's overrides (which still win, as before), and
empty ``hydra.sweeper.params``. Each job's summary records its ``repeat``; the report
merges the repeats of one configuration into one row.
"""
from __future__ import annotations

import sys
from pathlib import Path

from parallelkit.config.compose import CONF_DIR


def _is_override(arg: str) -> bool:
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def interleave_repeats(argv: list[str]) -> list[str]:
    """A multirun command line with repeats > 1 rewritten so the repeat index varies slowest."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if _is_override(a)]
    if any(a.startswith(("hydra/sweeper=", "+repeat=", "repeat=", "++repeat=")) for a in overrides):
        return argv  # another sweeper, or repeat indices given by hand
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=fixed, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - a broken command line: Hydra reports it as usual
        return argv
    repeats = cfg.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        print(f"parallelkit: config error: repeats={repeats!r}: must be an integer >= 1", file=sys.stderr)
        sys.exit(2)
    if repeats == 1:
        return argv
    # the experiment's parameters in their place; a command-line value for the same key replaces it there
    mine = {o.get_key_element(): o.input_line for o in parsed}
    params = [mine.pop(k, f"{k}={v}") for k, v in (cfg.hydra.sweeper.params or {}).items()]
    others = [a for a in argv if not _is_override(a)]
    return [*others, f"+repeat={','.join(map(str, range(repeats)))}", *params, *mine.values(), "hydra.sweeper.params=null"]


def distinct_strategies(argv: list[str]) -> list[str]:
    """``strategy=glob(...)`` expanded to presets that differ: a base preset whose options equal one of its
    named variants (deepspeed = zero2, fsdp = fsdp_zero3) would run the same job twice under two names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key.lstrip("+") != "strategy" or not value.startswith("glob("):
            out.append(arg)
            continue
        glob = OverridesParser.create().parse_overrides([arg])[0].value()
        names = glob.filter(sorted(p.stem for p in (Path(CONF_DIR) / "strategy").glob("*.yaml"))) \
            if isinstance(glob, Glob) else []
        kept, same = distinct_presets(names)
        if same:
            print(f"parallelkit: strategy={value}: running each configuration once "
                  f"({', '.join(f'{a} = {b}' for a, b in same.items())})", file=sys.stderr)
        out.append(f"{key}={','.join(kept)}")
    return out


def distinct_presets(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The presets among ``names`` that differ (the first of each equal group), and {each other one: its equal}."""
    kept: dict[str, str] = {}
    same: dict[str, str] = {}
    for name in names:
        k = _preset_key(name)
        if k in kept:
            same[name] = kept[k]
        else:
            kept[k] = name
    return list(kept.values()), same


def _preset_key(name: str) -> str:
    """A preset's class and options with the schema's defaults filled in: equal keys run equal jobs."""
    import json

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from parallelkit.config.compose import preset

    node = OmegaConf.to_container(preset(name), resolve=True)
    target = node.pop("_target_", "")
    node.pop("name", None)
    try:
        options = get_class(target).Options
        full = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(options), node))
        full.pop("name", None)
    except Exception:  # noqa: BLE001 - a preset that cannot be read is kept as its own job (it fails as a row)
        return name
    return json.dumps([target, full], sort_keys=True, default=str)


def sweep_jobs(argv: list[str]) -> list[list[str]]:
    """The override list of each job a multirun command line makes, in Hydra's order (the experiment's
    ``hydra.sweeper.params`` first, then the command line's; a key given on both: the command line's values).
    [] when the command line does not compose (Hydra reports it as usual)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if _is_override(a)]
    try:
        parser = OverridesParser.create()
        parsed = parser.parse_overrides(overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=fixed, return_hydra_config=True)
        mine = {o.get_key_element(): o.input_line for o in parsed}
        lines = [mine.pop(k, f"{k}={v}") for k, v in (cfg.hydra.sweeper.params or {}).items()] + list(mine.values())
        batches = BasicSweeper.split_arguments(parser.parse_overrides(lines), None)
    except Exception:  # noqa: BLE001
        return []
    return [job for batch in batches for job in batch]
