"""Tracing: proxies that record, the arguments they turn into graph data, and the trace.

Imports core, runtime and backends; never the frontend (models and envoys).
"""
