"""pytest configuration shared by all tests.

Its presence (with tests/__init__.py) makes pytest put the repository root on
sys.path, so tests can import test-only helpers as ``tests.reference.*``
whether run as ``pytest`` or ``python -m pytest``.
"""
