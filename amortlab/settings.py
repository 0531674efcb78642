"""Typed settings: a dataclass built from a (possibly nested) mapping, with a readable error for unknown keys.

Each settings dataclass states its defaults once; Hydra config groups that carry them register the dataclass as
their schema (``register_schema``), so the composed config shows every value and a mistyped key fails at start-up.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore

from amortlab.errors import AmortlabError

T = TypeVar("T")


def build(cls: type[T], node: Mapping[str, Any] | T | None, where: str = "") -> T:
    """``cls(**node)`` with nested dataclass fields built from nested mappings; ``node`` may already be a ``cls``.
    ``where`` (a config path such as ``evaluation.estimator``) names the keys in the error."""
    if isinstance(node, cls):
        return node
    node = dict(node or {})
    node.pop("_target_", None)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(names))
    if unknown:
        raise AmortlabError(f"{where or cls.__name__}: unknown key(s) {unknown}; the valid keys are "
                            f"{', '.join(n for n in names if n != '_target_')} ({cls.__module__}.{cls.__name__}).")
    hints = typing.get_type_hints(cls)
    for name, value in node.items():
        sub = hints.get(name)
        if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            node[name] = build(sub, value, f"{where}.{name}" if where else name)
    return cls(**node)


def register_schema(group: str, name: str, node: type) -> None:
    """Store ``node`` (a dataclass with a ``_target_`` field) as ``schema/<group>/<name>`` in Hydra's ConfigStore;
    a yaml selects it with ``defaults: [/schema/<group>@<key>: <name>]``."""
    ConfigStore.instance().store(group=f"schema/{group}", name=name, node=node)
