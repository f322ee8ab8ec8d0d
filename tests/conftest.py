"""Shared fixtures: the real default model (converted by `make setup`), loopback ports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warmturn.machine import free_port  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent

# The suite serves the plain default model: its mechanics tests (a client leaving mid-answer, SIGTERM in a
# busy batch, batching...) need its long answers, and the Read adapter makes it terse. Servers the tests
# start inherit this. tests/test_default_model_tools.py serves the shipped default (with the adapter).
os.environ.setdefault("WARMTURN_NO_READ_ADAPTER", "1")
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model as an mlx-lm directory (converted once into the user cache)."""
    from warmturn.server.convert import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir):
    """The real default model loaded with mlx-lm, shared by the whole session."""
    from mlx_lm import load

    return load(str(model_dir))
