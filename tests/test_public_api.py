"""The public API is exactly what ``autocert.__all__`` lists; everything else is internal."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import autocert
import autocert.web

PACKAGE = Path(autocert.__file__).parent

# Imports flow one way: a module may import only modules of its own layer or below.
LAYERS = {
    "errors": 0, "names": 0, "config": 0, "sealing": 0, "timefmt": 0, "_version": 0, "models": 0, "crypto": 0, "events": 0, "notify": 1,
    "store": 1,
    "acme_client": 2, "tls": 2,
    "worker": 3, "status": 3, "scheduler": 3,
    "manager": 4,
    "web": 5, "proxy": 5, "monitor": 5, "metrics": 5,
    "server": 6,
    "cli": 7, "__main__": 8, "__init__": 8,
}


def test_public_names_are_pinned() -> None:
    assert sorted(autocert.__all__) == [
        "AcmeError", "AutocertError", "ConfigError", "InvalidName", "IssuanceError", "Manager", "StoreError", "__version__",
    ]
    for name in autocert.__all__:
        assert hasattr(autocert, name)
    assert sorted(autocert.web.__all__) == ["MANAGER_KEY", "middleware", "setup", "status_app"]


def test_imports_flow_one_way() -> None:
    for path in PACKAGE.glob("*.py"):
        module = path.stem
        assert module in LAYERS, f"add {module} to the layer table"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                target = node.module.split(".")[0]
                assert LAYERS[target] <= LAYERS[module], f"{module} imports {target}, which sits above it"


def test_the_cli_loads_the_server_stack_only_when_a_command_needs_it() -> None:
    """`serve` binds its ports before importing SQLAlchemy and aiohttp (about a second), so
    connections made while it starts wait in the kernel's queue instead of being refused."""
    code = "import sys, autocert, autocert.cli; print(sorted(m for m in ('sqlalchemy', 'aiohttp', 'cryptography', 'autocert.manager') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
