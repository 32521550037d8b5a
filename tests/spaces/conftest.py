"""Fixtures of the spaces tests: one tiny ViT variant per parametrized test."""

from __future__ import annotations

import pytest
from _spaces_cases import VARIANTS


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param
