"""The shape of the code: layering without cycles, and a registry that every part of
the suite agrees with (a registered daemon without its unit, subcommand or README row
fails here)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from daemons import registry
from daemons.ctl import tune

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "daemons"
ONEBOX = [sys.executable, "-m", "daemons.ctl.main"]
# Shared layers: they must not reach up into the daemons, the registry or the commands.
LOWER = ("daemons.bus", "daemons.config", "daemons.cpu", "daemons.service", "daemons.feeder")
UPPER = ("daemons.router", "daemons.infer", "daemons.embed", "daemons.ocr", "daemons.ingest", "daemons.ctl",
         "daemons.registry")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        out[name] = {m for m in found if m.startswith("daemons")}
    return out


def unit_of(module: str) -> str:
    """daemons.bus.worker -> daemons.bus; daemons.cpu -> daemons.cpu."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_shared_layers_import_nothing_from_the_daemons() -> None:
    bad = []
    for module, deps in imports().items():
        if module.startswith(LOWER):
            bad += [f"{module} imports {d}" for d in deps if d.startswith(UPPER)]
    assert not bad, bad


def test_no_import_cycles_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for module, deps in imports().items():
        src = unit_of(module)
        graph.setdefault(src, set()).update(unit_of(d) for d in deps if unit_of(d) != src and unit_of(d) != "daemons")
    seen: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in sorted(graph):
        if node not in seen:
            visit(node)


def test_every_registered_daemon_has_its_unit_command_and_readme_row() -> None:
    readme = (ROOT / "README.md").read_text()
    units = {p.name for p in (ROOT / "units").iterdir()}
    drop_ins = tune.render(tune.example_topology(16, 2, 1), tune.plan(tune.example_topology(16, 2, 1)))
    for d in registry.DAEMONS:
        assert d.unit in units, f"{d.name}: no units/{d.unit}"
        text = (ROOT / "units" / d.unit).read_text()
        assert f"onebox {d.cmd} " in text, f"units/{d.unit} does not run `onebox {d.cmd}`"
        assert f"SyslogIdentifier=onebox-{d.name}" in text, f"units/{d.unit}: SyslogIdentifier"
        r = subprocess.run(ONEBOX + [d.cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"usage: onebox {d.cmd}" in r.stdout, r.stdout + r.stderr
        assert f"`onebox {d.cmd}" in readme, f"README.md has no `onebox {d.cmd}` row"
        prefix = d.unit.split("@")[0] + "@" if "@" in d.unit else d.unit
        assert prefix in readme, f"README.md does not name {d.unit}"
        assert f"{d.unit}.d/tune.conf" in drop_ins, f"onebox tune writes no drop-in for {d.unit}"
        assert set(d.sections) <= {"paths", "log", "bus", "router", "models", *registry_sections()}


def registry_sections() -> set[str]:
    from daemons import config

    return set(config.SECTIONS)


def test_every_unit_file_is_registered() -> None:
    registered = {d.unit for d in registry.DAEMONS}
    for p in (ROOT / "units").glob("*.service"):
        assert p.name in registered, f"units/{p.name} is not in daemons/registry.py"


def test_instances_follow_the_config() -> None:
    from daemons import config

    cfg = config.parse({"models": {"a": {"path": "x.gguf"}, "b": {"path": "y.gguf"}},
                        "embeddings": {"e": {"path": "e.gguf"}}})
    labels = [i.label for i in registry.instances(cfg)]
    assert labels == ["router", "infer@a", "infer@b", "embed@e", "ocr"]
    assert registry.expected_services(cfg) == ["infer/a", "infer/b", "embed/e", "ocr"]
    assert [i.unit for i in registry.instances(cfg)] == ["onebox-router.service", "onebox-infer@a.service",
                                                        "onebox-infer@b.service", "onebox-embed@e.service",
                                                        "onebox-ocr.service"]
    off = config.parse({"ocr": {"enabled": False}})
    assert [i.label for i in registry.instances(off)] == ["router"]
