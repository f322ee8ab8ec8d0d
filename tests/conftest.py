"""Shared fixtures: the real default model (converted by `make setup`), loopback ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from warmturn.machine import free_port  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
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
