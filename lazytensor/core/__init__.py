"""Core: the intervention graph, the op allow-list, errors, user sites and the tree walker.

Everything else builds on this layer; it imports nothing from lazytensor outside itself.
"""
