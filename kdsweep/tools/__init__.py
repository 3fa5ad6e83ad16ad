"""Tools beside the pipeline: `kdsweep bench`, the first-GPU suite, and `kdsweep ui`.
"""
