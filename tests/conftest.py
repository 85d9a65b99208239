"""Shared pytest fixtures.

Sections are owned by different parts of the test suite; add new fixtures in a new section.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Test the working tree when the package is not installed.
if importlib.util.find_spec("autocert") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pebble import Pebble  # noqa: E402

# ---------------------------------------------------------------------------------------------
# ACME test CA: Pebble + challtestsrv on loopback (logic in tests/pebble.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """One Pebble shared by the whole session (its issuing root is new at each start)."""
    with Pebble(workdir=tmp_path_factory.mktemp("pebble")) as instance:
        yield instance


@pytest.fixture
def pebble_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Pebble]]:
    """Start extra Pebbles with their own environment, e.g. ``pebble_factory(PEBBLE_WFE_NONCEREJECT="50")``."""
    started: list[Pebble] = []

    def start(**env: str) -> Pebble:
        instance = Pebble(env, workdir=tmp_path_factory.mktemp("pebble"))
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in reversed(started):
        instance.stop()


# --- end of the ACME test CA section ---
