"""MLflow bookkeeping: the client (explicit parent ids, batched logging), the vocabulary of every tag
and attribute key kdsweep writes, the parent run's description, and the cleanup of runs of dead processes.
"""
