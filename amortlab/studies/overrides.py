"""Values as text: Hydra override strings (a key, a value, a quoted path, the search path of the setting files) and
the short form of a value in setting ids and table cells."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from amortlab.studies.spec import SweepError


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.partition("=")[0].lstrip("+~")


def override_value(v: Any) -> str:
    """A YAML value as the right-hand side of a Hydra override."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """base then extra; an extra override replaces a base override of the same key."""
    keys = {override_key(o) for o in extra}
    return [o for o in base if override_key(o) not in keys] + list(extra)


def quote(value: str) -> str:
    """A path as a Hydra override value: bare when it only has safe characters, else double-quoted."""
    if re.fullmatch(r"[A-Za-z0-9_./:-]+", value):
        return value
    if '"' in value or "\\" in value:
        raise SweepError(f"path {value!r} contains a quote or backslash; pick an out_dir without them.")
    return f'"{value}"'


def searchpath(settings_dir: Path) -> str:
    """The override that puts the setting files (``<settings_dir>/setting/<id>.yaml``) on Hydra's search path."""
    return f"hydra.searchpath=[{quote('file://' + str(settings_dir))}]"


def short(v: Any) -> str:
    """A value as it reads in a setting id or a table cell: ``0.2``, ``true``, ``null``, lists joined by ``-``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, "g")
    if v is None:
        return "null"
    if isinstance(v, list):
        return "-".join(short(x) for x in v)
    return str(v)
