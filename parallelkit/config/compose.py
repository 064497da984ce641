"""The run's config as Hydra composes it, from the YAML files shipped in the package (``parallelkit/conf``).

Everything that reads the command line or the shipped YAML is here: the config folder (defined once), a
preset's keys, the one-line checks of a command line Hydra would answer with a page, and composing the
config outside a Hydra app (estimate, tune, the tests).
"""
from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from parallelkit.config.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
STRATEGY_DIR = Path(CONF_DIR) / "strategy"


def strategy_presets() -> list[str]:
    return sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))


def shipped_default(key: str):
    """A setting's default as conf/config.yaml ships it (for what runs outside a composed run config)."""
    return OmegaConf.select(OmegaConf.load(Path(CONF_DIR) / "config.yaml"), key)


def explicit_keys(overrides, strategy: str | None = None) -> set[str]:
    """The keys set on the command line (``key=v``, ``+key=v``, ``++key=v``; a deletion ``~key`` sets nothing),
    plus those the chosen strategy preset sets.

    A preset is a choice made by name: ``strategy=zero3`` says "stage 3" as plainly as
    ``strategy.zero_stage=3`` does, so what a preset sets beyond the base it extends (zero3 over
    deepspeed.yaml: zero_stage) counts as given and wins over a DeepSpeed JSON. The base itself
    (``strategy=deepspeed``) only carries defaults, so with it the JSON decides everything it states.
    """
    keys = {o.lstrip("+").split("=", 1)[0] for o in overrides if "=" in o and not o.startswith("~")}
    return keys | {f"strategy.{k}" for k in _preset_keys(strategy)} if strategy else keys


def _preset_keys(name: str) -> set[str]:
    """Keys conf/strategy/<name>.yaml and the presets it extends set, less those of the base they extend."""
    path = STRATEGY_DIR / f"{name}.yaml"
    if not path.is_file():
        return set()
    node = OmegaConf.to_container(OmegaConf.load(path))
    parents = [d for d in node.pop("defaults", None) or [] if isinstance(d, str) and d != "_self_"]
    if not parents:  # a family's base (deepspeed.yaml): defaults, not choices
        return set()
    return (set(node) - {"name", "_target_"}).union(*map(_preset_keys, parents))


def preset(name: str) -> DictConfig:
    """A conf/strategy preset as Hydra composes it: the presets in its ``defaults`` first, then itself
    (``_self_`` last when unlisted). A fraction of the cost of composing the whole config again."""
    node = OmegaConf.load(STRATEGY_DIR / f"{name}.yaml")
    with open_dict(node):
        defaults = list(node.pop("defaults", None) or [])
    order = defaults if "_self_" in defaults else [*defaults, "_self_"]
    return OmegaConf.merge(*(node if d == "_self_" else preset(d) for d in order))


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
    """One line for an override of a key that does not exist (a typo such as train.stepz=5), for a single run or
    a sweep (whose every job would fail the same way: its first value of each swept key is composed)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    overrides = [a for a in argv if "=" in a and not a.startswith(("hydra.", "hydra/", "-"))]
    if any(a in ("-m", "--multirun") for a in argv):
        for a in argv:
            if a.startswith("hydra.") and "=" in a and _first_job([a]) != [a]:  # Hydra refuses it, after the
                key, value = a.split("=", 1)  # sweep's calibrations: say so first
                return (f"{key}: a sweep over Hydra's own settings is not supported; sweep the key itself: "
                        f"{key.removeprefix('hydra.sweeper.params.')}={value}")
        overrides = _first_job(overrides)
        if overrides is None:
            return None
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


def _first_job(overrides: list[str]) -> list[str] | None:
    """A sweep's overrides with each swept key at its first value (None: a sweep this cannot read)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        out = []
        for o in parsed:
            if not o.is_sweep_override():
                out.append(o.input_line)
            elif o.input_line.split("=", 1)[1].split("(")[0] in ("glob", "range", "interval", "choice", "tag"):
                continue  # a function of the config loader: the key is checked with its config-file value
            else:
                out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        return out
    except Exception:  # noqa: BLE001 - Hydra reports a sweep it cannot parse itself
        return None


def open_strategy_keys(argv: list[str]) -> list[str]:
    """``strategy.KEY=V`` -> ``++strategy.KEY=V``. A backend's options and their defaults live in its schema
    (``Options`` in its file), not in its YAML, so Hydra must be let to add them; the schema then refuses a
    wrong type or an unknown option in one line (``Strategy.options``)."""
    return [f"++{a}" if re.match(r"strategy\.[\w.]+=", a) else a for a in argv]


def compose_config(overrides: list[str]) -> tuple[DictConfig, str]:
    """The run's config for these overrides (no output folder) and its strategy preset name."""
    from hydra import compose, initialize_config_dir

    if (err := check_group_choices(overrides)) is not None:
        raise ConfigError(err)
    overrides = open_strategy_keys(overrides)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - Hydra's messages span lines: keep them to one
        raise ConfigError(" ".join(str(e).split())) from None
    choice = cfg.hydra.runtime.choices.strategy
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choice
