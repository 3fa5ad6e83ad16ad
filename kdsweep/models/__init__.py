"""Models: the built-in architectures (zoo), models from anywhere (specs), taps on any module through
forward hooks, the factory that builds them, and their cost (parameters, MACs, latency).
"""
