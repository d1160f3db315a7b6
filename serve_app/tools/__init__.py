"""Operator tools: the ``serve-app`` command (check, fetch, capacity, tiny-config) and
``launch`` (a Serve config run in-process, for tests and benchmarks). No request enters here."""
