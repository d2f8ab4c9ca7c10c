"""Protocol: the typed messages between client and server and their frame codec.

Imports :mod:`lazytensor.core` only (graphs travel as data, never as code).
"""
