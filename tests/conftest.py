"""Fixtures over the shared helpers (tests/helpers.py)."""

import os

import pytest

# Caches decode eagerly unless a test asks for compilation (tests/core/test_state.py and the
# SmolLM2 test): compiling every tiny layout would cost the suite minutes.
os.environ.setdefault("LESSKV_COMPILE", "0")

from helpers import UNIFORM, make_tiny_model


@pytest.fixture(params=UNIFORM)
def tiny_model(request):
    return make_tiny_model(request.param)
