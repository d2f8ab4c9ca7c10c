"""Runtime: replaying a graph inside a model's forward pass (plans, executor, shape-only runs).

Imports :mod:`lazytensor.core` only. The server runs graphs with this layer alone.
"""
