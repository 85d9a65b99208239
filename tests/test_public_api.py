"""The public API is exactly what ``autocert.__all__`` lists; everything else is internal."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import autocert
import autocert.web

PACKAGE = Path(autocert.__file__).parent

# Imports flow one way: a module may import only modules of its own layer or below. A
# subpackage (``_store``, ``_acme``) counts as one module; its files may import each other.
LAYERS = {
    "_errors": 0, "_names": 0, "_config": 0, "_config_file": 0, "_sealing": 0, "_timefmt": 0, "_version": 0, "_models": 0, "_crypto": 0, "_events": 0, "_signals": 0,
    "_proxy_protocol": 0, "_descriptors": 0, "_issuers": 0, "_schema": 0,
    "_handover": 1,
    "_policy": 1, "_notify": 1, "_tls": 1, "_board": 1, "_status_rules": 1,
    "_store": 2, "_listing": 2,
    "_acme": 3, "_status": 3, "_ask": 3, "_caps": 3, "_dns": 3,
    "_worker": 4, "_scheduler": 4, "_ca": 4,
    "_manager": 5, "_watch": 5,
    "_front": 6, "web": 6, "_http": 6, "_proxy": 6, "_passthrough": 6, "_monitor": 6, "_metrics": 6, "_duties": 6,
    "_server": 7, "_supervisor": 7,
    "_cli": 8, "_cli_manager": 8, "_parser": 8, "_console": 7, "__main__": 9, "__init__": 9,
}


def _imported_modules(path: Path) -> Iterator[str]:
    """The top-level autocert modules ``path`` imports, relative or absolute, anywhere in it."""
    inside = path.parent != PACKAGE  # a file of a subpackage: one more level to climb
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "autocert":
                    yield from ([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
            elif node.level == 1 and inside:
                continue  # a sibling in the same subpackage
            elif node.level == (2 if inside else 1):
                yield from ([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "autocert" and len(parts) > 1:
                    yield parts[1]


def test_public_names_are_pinned() -> None:
    assert sorted(autocert.__all__) == [
        "AcmeError", "AutocertError", "ConfigError", "InvalidName", "IssuanceError", "Manager", "StoreError", "__version__",
    ]
    for name in autocert.__all__:
        assert hasattr(autocert, name)
    assert sorted(autocert.web.__all__) == ["MANAGER_KEY", "middleware", "refuse_misdirected", "setup", "status_app"]


def test_imports_flow_one_way() -> None:
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        module = relative.parts[0].removesuffix(".py")
        assert module in LAYERS, f"add {module} to the layer table"
        for target in _imported_modules(path):
            assert target in LAYERS, f"{relative} imports autocert.{target}, which is not in the layer table"
            assert LAYERS[target] <= LAYERS[module], f"{relative} imports {target}, which sits above it"


def test_the_front_does_not_know_what_runs_behind_it() -> None:
    """``_server`` puts the HTTP app or the pass-through behind the front; ``_front`` imports neither."""
    assert not set(_imported_modules(PACKAGE / "_front.py")) & {"_passthrough", "_proxy", "web", "_server"}


def test_only_the_public_api_is_unprefixed() -> None:
    """Everything but ``autocert`` itself and ``autocert.web`` is private (``_``-prefixed)."""
    public = sorted(
        path.name for path in PACKAGE.iterdir()
        if not path.name.startswith("_") and (path.suffix == ".py" or (path / "__init__.py").exists())
    )
    assert public == ["web.py"]


def test_the_cli_loads_the_server_stack_only_when_a_command_needs_it() -> None:
    """`serve` binds its ports before importing SQLAlchemy and aiohttp (about a second), so
    connections made while it starts wait in the kernel's queue instead of being refused."""
    code = "import sys, autocert, autocert._cli; print(sorted(m for m in ('sqlalchemy', 'aiohttp', 'cryptography', 'autocert._manager') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_ruff_finds_nothing() -> None:
    """The lint rules in pyproject.toml (errors only: undefined or unused names, syntax) hold
    for the whole tree."""
    import shutil

    import pytest

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extras)")
    result = subprocess.run([ruff, "check", "--no-cache", "autocert", "tests", "bench", "scripts", "examples"],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
