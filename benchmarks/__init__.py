"""Benchmarks: every datalayer path measured against raw asyncpg running the same SQL.

``harness`` runs the scenarios; every other module here that defines
``SCENARIOS: list[Scenario]`` contributes its own. ``datalayer bench`` loads this package
(as ``benchmarks``) and calls :func:`benchmarks.harness.run`.
"""
