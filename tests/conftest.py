"""Shared test configuration (helpers live in ``tests/_helpers.py``)."""

import builtins

import pytest


@pytest.fixture
def no_tqdm(monkeypatch):
    """Hide tqdm, so that progress is reported as printed lines."""
    real_import = builtins.__import__

    def hide(name, *args, **kwargs):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", hide)
