"""What every layer may use: one-line errors, environment failures, URIs and their secrets, digests,
atomic files and temporary directories, process identity and locks. Nothing here knows a study.
"""
