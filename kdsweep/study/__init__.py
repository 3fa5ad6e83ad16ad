"""A study: its configuration, budget, workers and progress, the checks that keep it one study (fixed
inputs, store agreement, the pair), and the loop that runs its trials.
"""
