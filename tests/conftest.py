"""Fixtures the tests share: simulators that skip, with the reason, where they are missing."""

import pytest

from builds import needs


@pytest.fixture
def verilator():
    needs("verilator")
    return "verilator"


@pytest.fixture
def icarus():
    needs("icarus")
    return "icarus"
