"""Tests of the documented API (shared/DOCUMENTED_API.md), one file per documentation area.

A package, so that its module names (``docs_api.test_hooks``) do not clash with ``tests/hooks/test_hooks.py``.
"""
