"""The settings of a study: settings x grid -> Settings with stable ids, each written as a ``# @package _global_``
config file (``<settings_dir>/setting/<id>.yaml``) and composed once with train.py's config before anything runs."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import amortlab.schemas  # noqa: F401  (registers the typed schemas the configs are composed against)
from amortlab.studies.overrides import override_key, override_value, searchpath, short
from amortlab.studies.spec import CONF, SweepError


@dataclass
class Setting:
    id: str
    overrides: dict[str, Any]                 # override key -> value (YAML value), setting entry then grid
    series: str                               # one line in the plots (the setting entry without its expanded lists)
    varied: list[str] = field(default_factory=list)  # keys that the setting's lists expanded (the strength axis)

    def override_strings(self) -> list[str]:
        return [f"{k}={override_value(v)}" for k, v in self.overrides.items()]


def is_group(key: str) -> bool:
    """True when ``key`` selects a config group option (``encoder_regularizer: denoising``), not a value."""
    key = key.lstrip("+")
    return "/" in key or (CONF / key).is_dir()


def _part(key: str, value: Any) -> str:
    if is_group(key):
        return short(value)
    return key.lstrip("+~").rsplit(".", 1)[-1] + short(value)


def _sanitize(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "base"
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|true|false|null|nan|inf", s, flags=re.I):
        s = "s" + s  # Hydra would parse a bare number / bool as such, not as an option name
    return s


def expand(study: dict[str, Any]) -> list[Setting]:
    """settings x grid -> Settings with stable ids (e.g. ``denoising_sigma0.2_k8``)."""
    grid = study.get("grid") or {}
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise SweepError(f"study {study['name']}: grid '{k}' must be a non-empty list of values.")
    grid_items = list(grid.items())
    out: list[Setting] = []
    for entry in study["settings"]:
        entry = dict(entry)
        label = entry.pop("id", None)
        for k, v in entry.items():
            if isinstance(v, list) and not v:
                raise SweepError(f"study {study['name']}: setting {entry}: '{k}' is an empty list.")
            if k in grid:
                raise SweepError(f"study {study['name']}: '{k}' is in both a setting and the grid; keep it in one.")
        scalars = [(k, v) for k, v in entry.items() if not isinstance(v, list)]
        lists = [(k, v) for k, v in entry.items() if isinstance(v, list)]
        series = _sanitize(str(label)) if label is not None else _sanitize("_".join(_part(k, v) for k, v in scalars))
        for combo in itertools.product(*[v for _, v in lists]):
            chosen = dict(entry)
            chosen.update({k: c for (k, _), c in zip(lists, combo)})
            for gcombo in itertools.product(*[v for _, v in grid_items]):
                overrides = dict(chosen)
                overrides.update({k: c for (k, _), c in zip(grid_items, gcombo)})
                parts = [str(label)] if label is not None else [_part(k, v) for k, v in scalars]
                parts += [_part(k, c) for (k, _), c in zip(lists, combo)]
                parts += [_part(k, c) for (k, _), c in zip(grid_items, gcombo)]
                out.append(Setting(id=_sanitize("_".join(p for p in parts if p)), overrides=overrides, series=series,
                                   varied=[k for k, _ in lists]))
    seen: dict[str, Setting] = {}
    for s in out:
        if s.id in seen:
            raise SweepError(f"study {study['name']}: two settings get the id '{s.id}' ({seen[s.id].overrides} and "
                             f"{s.overrides}). Give the setting entries distinct `id:` labels.")
        seen[s.id] = s
    return out


def setting_yaml(setting: Setting, study_name: str, extra: dict[str, Any] | None = None) -> str:
    """The ``# @package _global_`` config of one setting: group choices as defaults overrides, values nested."""
    defaults: list[str] = []
    values: dict[str, Any] = {}
    for key, value in setting.overrides.items():
        if key.startswith("~"):
            raise SweepError(f"setting {setting.id}: deletions ('{key}') cannot be written into a setting; put them "
                             f"in the study's base overrides.")
        bare = key.lstrip("+")
        if is_group(bare):
            defaults.append(f"override /{bare}: {override_value(value) if value is not None else 'null'}")
            continue
        node = values
        parts = bare.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SweepError(f"setting {setting.id}: '{key}' conflicts with another key of the setting.")
        node[parts[-1]] = value
    values.update(extra or {})
    lines = ["# @package _global_",
             f"# Written by sweep.py (study {study_name}, setting {setting.id}); rewritten on every sweep.py call.",
             f"#   {' '.join(setting.override_strings())}"]
    if defaults:
        lines.append("defaults:")
        lines += [f"  - {d}" for d in defaults]
    if values:
        lines.append(OmegaConf.to_yaml(OmegaConf.create(values)).rstrip())
    return "\n".join(lines) + "\n"


def write_setting_files(settings: list[Setting], settings_dir: Path, study_name: str,
                        extras: dict[str, dict[str, Any]] | None = None) -> None:
    """``<settings_dir>/setting/<id>.yaml`` for every setting (unchanged files untouched, others' files removed)."""
    group_dir = settings_dir / "setting"
    group_dir.mkdir(parents=True, exist_ok=True)
    keep = {f"{s.id}.yaml" for s in settings}
    for old in group_dir.glob("*.yaml"):
        if old.name not in keep:
            old.unlink()
    for s in settings:
        text = setting_yaml(s, study_name, (extras or {}).get(s.id))
        path = group_dir / f"{s.id}.yaml"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


def _stackable(cfg) -> frozenset[str] | None:
    """None when the composed config's method cannot train its seeds as one stacked computation
    (``amortlab.stack``), or when it trains for a wall-clock budget (``trainer.max_time``, which stacked models
    would share; ``check_stackable`` refuses it); else the config keys whose values its stacked models may also differ
    in."""
    from hydra.utils import get_class

    from amortlab.stack.values import stackable_keys

    try:
        if not getattr(get_class(cfg.inference._target_), "stackable", False):
            return None
        if cfg.trainer.get("max_time") is not None:
            return None
        return frozenset(stackable_keys(cfg))
    except Exception:  # noqa: BLE001  (an unimportable target fails properly at launch, with its own message)
        return None


def compose_settings(settings: list[Setting], settings_dir: Path, run_overrides: list[str], seed: int,
                     study_name: str, stackable: dict[str, frozenset[str]] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """Compose every setting's train.py config once (catches a wrong key or option before anything is launched) and
    return the extra values its setting file gets: W&B tags (the composed ones + ``study:NAME``) and run name.
    ``stackable`` (if given) receives, for each setting whose method can stack its seeds, the config keys its
    stacked models may also differ in (``amortlab.stack.values``)."""
    job_overrides = [o for o in run_overrides if not override_key(o).startswith("hydra")]
    extras: dict[str, dict[str, Any]] = {}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for s in settings:
                overrides = [searchpath(settings_dir), f"+setting={s.id}", *job_overrides, f"seed={seed}"]
                try:
                    cfg = compose("config", overrides=overrides)
                except Exception as e:  # noqa: BLE001  (Hydra raises many types; all mean "this does not compose")
                    cause = f" ({e.__cause__})" if e.__cause__ and str(e.__cause__) not in str(e) else ""
                    msg = " ".join(f"{e}{cause}".split("Config search path")[0].split()).rstrip(".")
                    raise SweepError(
                        f"Setting '{s.id}' of study {study_name} does not compose: {msg}. Its overrides: "
                        f"{' '.join(s.override_strings()) or '(none)'}; for every run: {' '.join(job_overrides)}. "
                        f"Fix the study yaml or the override (print a config with `python train.py --cfg job "
                        f"OVERRIDES`).") from None
                keys = _stackable(cfg) if stackable is not None else None
                if keys is not None:
                    stackable[s.id] = keys
                tags = [t for t in OmegaConf.to_container(cfg.tags, resolve=False) if t != f"study:{study_name}"]
                extra: dict[str, Any] = {"tags": [*tags, f"study:{study_name}"]}
                if cfg.get("name") is None:
                    extra["name"] = f"{s.id}-s${{seed}}"
                extras[s.id] = extra
    finally:
        GlobalHydra.instance().clear()
    return extras
