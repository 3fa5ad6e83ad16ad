"""Distillation methods: one file per method, each a small `Method` class (base.py) with its own search
space (space.py), found by the registry (registry.py) at import: adding a method is adding one file.
"""
