"""Fixtures shared by the test modules."""

import os

import pytest


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """Environment for the commands the tests run: a private cache, offline hubs, one thread per process."""
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "LINVID_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def cache_env(env, monkeypatch):
    """The same private cache for in-process calls (e.g. the demo videos a run directory's config names)."""
    monkeypatch.setenv("LINVID_CACHE", env["LINVID_CACHE"])
    return env
