"""What every layer shares: the registry schema (`core.config`) and the typed errors (`core.errors`).

The layers import downwards only: core <- backends <- gateway. Nothing here imports from the others.
"""
