"""Locust load tests for realtime-gateway: `locust -f loadtest/` (see locustfile.py).

Locust loads every .py file in this directory whose name does not start with "_" as a
locustfile; the support modules are therefore underscore-named (`_audio`, `_options`,
`_metrics`, `_session`), so they are imported once, as `loadtest._x`, and never twice.
`python -m loadtest.node` starts a node with the mock upstream for local runs.
"""
