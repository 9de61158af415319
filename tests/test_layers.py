"""The house's shape, read from the source: imports only go down, the kernel seam sits on a low
floor and is the only door to the kernel's libraries and to other programs."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mape_daemon"
# What only the kernel seam may import: netlink, netfilter, D-Bus, other programs.
SEAM_ONLY = {"pyroute2", "iptc", "subprocess", "ctypes", "socket", "jeepney"}
# What the seam may import of ours: the values it reads and writes, and the errors it raises.
SEAM_MAY_USE = {"mape_daemon.errors", "mape_daemon.state", "mape_daemon.actions"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


@cache
def imports(name: str) -> tuple[frozenset[str], frozenset[str]]:
    """(modules of ours, top-level outside packages) that `name` imports anywhere in its body."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                ours.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.ImportFrom) and node.module:
            outside.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            outside |= {a.name.split(".")[0] for a in node.names}
    return frozenset(m for m in ours if m in MODULES and m != name), frozenset(outside)


def floors() -> dict[str, int]:
    floor: dict[str, int] = {}

    def walk(name: str, stack: tuple[str, ...]) -> int:
        assert name not in stack, f"import cycle: {' -> '.join((*stack, name))}"
        if name not in floor:
            floor[name] = 1 + max((walk(m, (*stack, name)) for m in imports(name)[0]), default=-1)
        return floor[name]

    for name in MODULES:
        walk(name, ())
    return floor


def test_imports_only_go_down_and_the_house_has_fewer_floors_than_before_issue_18():
    floor = floors()
    assert max(floor.values()) + 1 <= 10, floor  # 11 before the firewall features and actions moved


def test_the_kernel_seam_imports_nothing_of_ours_above_state_and_actions():
    for name in MODULES:
        if name.startswith("mape_daemon.kernel"):
            above = {m for m in imports(name)[0] if not m.startswith("mape_daemon.kernel")} - SEAM_MAY_USE
            assert not above, f"{name} imports {sorted(above)}"


def test_only_the_kernel_seam_talks_to_the_kernel_and_other_programs():
    for name in MODULES:
        if not name.startswith("mape_daemon.kernel"):
            leaks = imports(name)[1] & SEAM_ONLY
            assert not leaks, f"{name} imports {sorted(leaks)}: only mape_daemon.kernel may"
