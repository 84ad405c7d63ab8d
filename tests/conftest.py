"""
Run every test from a scratch directory: trial's ``mktemp()`` makes paths
relative to the working directory, which under pytest would otherwise be
the checkout itself.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _scratchWorkingDirectory(tmp_path_factory):
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("trial"))
    # Node keys made by tests (and the daemons they start) stay out of ~.
    os.environ.setdefault("P2PRELAY_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    yield
    os.chdir(previous)
