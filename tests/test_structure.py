"""Structure gates: no import cycles between the package's parts (lazy imports inside functions count: they hide a
cycle, they do not remove it; ``if TYPE_CHECKING:`` imports do not run and are left out), and every settings default
stated once (the typed schema holds it; the yaml that selects the schema does not repeat it)."""
import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT

PKG = ROOT / "amortlab"


def _unit(module: str) -> str | None:
    """``amortlab.evaluation.gaps`` -> ``amortlab.evaluation``; ``amortlab.run`` -> itself; others -> None."""
    parts = module.split(".")
    if parts[0] != "amortlab" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")
                out.add(".".join([*base[: len(base) - (node.level - 1) if path.name == "__init__.py" else None],
                                  node.module or ""]).strip("."))
            elif node.module:
                out.add(node.module)
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = _unit(module)
        if src is None:
            continue
        for target in _imports(path, module):
            dst = _unit(target)
            if dst and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycles_between_packages():
    graph = import_graph()
    assert "amortlab.methods" in graph and "amortlab.evaluation" in graph["amortlab.methods"]  # the scan sees edges
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _restated(node: dict, schema, path: str) -> list[str]:
    import dataclasses

    out = []
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in node.items():
        f = fields.get(key)
        if f is None:
            continue
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else None) and isinstance(value, dict):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            out += _restated(value, type(default), f"{path}.{key}")
        elif value == default and not isinstance(default, (list, dict)) or (isinstance(default, list)
                                                                              and value == default):
            out.append(f"{path}.{key}: {value!r}")
    return out


def test_every_settings_default_is_stated_once():
    """A yaml that selects a typed schema (or is the top-level config) must not repeat the schema's defaults (k1.yaml
    is exempt: the option *is* the value train = 1)."""
    from amortlab.config import Config, Evaluation, ImportanceSamples
    from amortlab.evaluation.gaps import GapsConfig
    from amortlab.evaluation.iw_svi import SVIConfig
    from amortlab.refinement import RefinementConfig

    conf = ROOT / "conf"
    checks = [(conf / "config.yaml", Config, "", None)]
    # each importance_samples option is defined by its `train` value (k1: train 1); the others must not restate
    checks += [(p, ImportanceSamples, "importance_samples", None) for p in (conf / "importance_samples").glob("*.yaml")
               if p.name != "k1.yaml"]
    checks += [(p, Evaluation, "evaluation", None) for p in (conf / "evaluation").glob("*.yaml")]
    checks += [(conf / "evaluation" / "iw_svi.yaml", SVIConfig, "evaluation.estimator", "estimator"),
               (conf / "evaluation" / "gaps.yaml", GapsConfig, "evaluation.estimator", "estimator"),
               (conf / "inference" / "sa_vae.yaml", RefinementConfig, "inference.refinement", "refinement")]
    problems = []
    for path, schema, where, key in checks:
        node = yaml.safe_load(path.read_text()) or {}
        node = {k: v for k, v in node.items() if k not in ("defaults", "hydra")}
        if key is not None:
            node = node.get(key) or {}
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in _restated(node, schema, where)]
    assert not problems, "defaults restated in yaml (keep them in the schema only): " + "; ".join(problems)
    # the check itself sees a restated default
    assert _restated({"steps": 100, "lr": 0.5}, SVIConfig, "x") == ["x.steps: 100"]
