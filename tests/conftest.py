"""Shared test configuration (helpers live in ``tests/_helpers.py``)."""
