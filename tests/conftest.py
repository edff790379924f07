"""Fixtures over the shared helpers (tests/helpers.py)."""

import pytest

from helpers import TINY_CONFIGS, make_tiny_model


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return make_tiny_model(request.param)
