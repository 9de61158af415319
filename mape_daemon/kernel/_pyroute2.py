"""Loaded first (from kernel/__init__), before anything imports pyroute2."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def register_light() -> None:
    """pyroute2's package __init__ imports every module it has (wireless, IPVS, NDB, plan9, ...):
    about 6 MiB of a daemon that needs its rtnetlink and conntrack sockets. Register the package
    without running it; the first `from pyroute2 import X` anywhere still gets the whole package."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return  # not installed: the import below says so
    package = types.ModuleType("pyroute2")
    package.__spec__, package.__file__ = spec, spec.origin
    package.__path__ = list(spec.submodule_search_locations)

    def whole(name: str) -> object:
        if name.startswith("__") or importlib.util.find_spec(f"pyroute2.{name}") is not None:
            raise AttributeError(name)  # `from pyroute2 import netns`: the import system loads the submodule
        del package.__dict__["__getattr__"]
        exec(compile(Path(spec.origin).read_text(), spec.origin, "exec"), package.__dict__)
        return getattr(package, name)

    package.__dict__["__getattr__"] = whole
    sys.modules["pyroute2"] = package
