"""The import graph points one way (ARCHITECTURE.md): read from the source, not assumed.

entry points (cli, app) → adapter / scan → core (pipeline, policy, config, snapshot, the check
interface, the model) → services; checks → the model, the check interface and services; only
the entry points see the registry, only the adapter imports pymilter, and nothing on the
runtime path imports the lab.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mailward

PACKAGE = Path(mailward.__file__).parent

# What each layer may import from mailward (module-name prefixes), besides itself.
MODEL = ("mailward.core.transaction", "mailward.core.verdict", "mailward.core.outcomes",
         "mailward.core.dkimglue", "mailward.core.authresults", "mailward.core.arcsets",
         "mailward.core.ini", "mailward.core.settings", "mailward.core.addresses",
         "mailward.core.nets", "mailward.core.bodyhash")
ALLOWED: dict[str, tuple[str, ...]] = {
    "mailward.services": ("mailward.errors", "mailward.core.ini", "mailward.services",
                          "mailward.__init__"),
    "mailward.core": ("mailward.errors", "mailward.core", "mailward.services"),
    "mailward.checks": ("mailward.errors", *MODEL, "mailward.core.check", "mailward.services"),
    "mailward.adapter": ("mailward.errors", "mailward.core", "mailward.services",
                         "mailward.adapter"),
    "mailward.scan": ("mailward.errors", "mailward.core", "mailward.services"),
    "mailward.audit": ("mailward.errors", "mailward.core", "mailward.services", "mailward.sts"),
    "mailward.sts": ("mailward.errors", "mailward.core.settings", "mailward.core.ini",
                     "mailward.services", "mailward.sts"),
    "mailward.reference": ("mailward.errors", "mailward.core", "mailward.services"),
    "mailward.lab": ("mailward.errors", "mailward.core", "mailward.services", "mailward.scan",
                     "mailward.lab"),
    "mailward.app": ("mailward.errors", "mailward.core", "mailward.services",
                     "mailward.adapter", "mailward.checks", "mailward.reports"),
    "mailward.reports": ("mailward.errors", "mailward.core", "mailward.services",
                         "mailward.reports"),
    "mailward.cli": ("mailward",),
    "mailward.errors": (),
    "mailward.__main__": ("mailward.cli",),
    "mailward.__init__": (),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (`from a import b` counts as `a.b` when
    `b` is a module, else `a`)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_path = PACKAGE.parent / Path(*candidate.split("."))
                is_module = as_path.with_suffix(".py").exists() or as_path.is_dir()
                out.add(candidate if is_module else node.module)
    return out


MODULES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> str:
    return max((key for key in ALLOWED if name == key or name.startswith(key + ".")),
               key=len)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name: str) -> None:
    allowed = ALLOWED[layer(name)]
    for target in sorted(t for t in MODULES[name] if t.split(".")[0] == "mailward"):
        registry = name == "mailward.checks.__init__"  # the registry imports every check
        if (name.startswith("mailward.checks.") and target.startswith("mailward.checks")
                and not registry):
            pytest.fail(f"{name} imports {target}: checks never import each other "
                        "(read a typed outcome instead)")
        ok = target == "mailward" and (name == "mailward.services.metrics"  # __version__
                                       or name.startswith(("mailward.sts.",
                                                           "mailward.reports.")))
        ok |= registry and target.startswith("mailward.checks.")
        ok |= any(target == a or target.startswith(a + ".") for a in allowed)
        assert ok, f"{name} may not import {target} (allowed: {', '.join(allowed)})"


def test_only_the_adapter_imports_pymilter() -> None:
    importers = sorted(n for n, targets in MODULES.items()
                       if any(t.split(".")[0] in ("Milter", "milter") for t in targets))
    assert importers == ["mailward.adapter.milter"]


def test_only_entry_points_see_the_registry() -> None:
    seen_by = sorted(n for n, targets in MODULES.items()
                     if "mailward.checks" in targets and not n.startswith("mailward.checks"))
    assert seen_by == ["mailward.app", "mailward.cli"]


def test_the_graph_has_no_cycle() -> None:
    graph = {n: {t for t in ts if t in MODULES or f"{t}.__init__" in MODULES}
             for n, ts in MODULES.items()}
    graph = {n: {t if t in MODULES else f"{t}.__init__" for t in ts} for n, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, "import cycle: " + " -> ".join([*path, node])
        state[node] = 1
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_the_layer_test_can_fail(tmp_path: Path) -> None:
    """A check importing another check, or the pipeline, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from mailward.checks import spf\nfrom mailward.core import pipeline\n")
    assert imports(bad) == {"mailward.checks.spf", "mailward.core.pipeline"}
