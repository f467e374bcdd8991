"""Benchmarks of portal_pool against the seed pattern and raw anyio portals.

Run ``python -m bench`` (see ``bench/README.md``).
"""
