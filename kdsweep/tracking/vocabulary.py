"""Every key kdsweep writes into MLflow tags and Optuna attributes, declared once.
"""

from __future__ import annotations

PARENT_TAG = "mlflow.parentRunId"


OWNER_TAG = "kdsweep.owner"


OWNER_ATTR = "kdsweep.owner"


REASON_ATTR = "fail_reason"


RETRY_OF_ATTR = "kdsweep.retry_of"


EPOCHS_ATTR = "kdsweep.epochs_trained"  # set on every trial that trained; its presence is what counts


NOTE_TAG = "mlflow.note.content"


RUN_ID_ATTR = "mlflow_run_id"


PARENT_ATTR = "mlflow_parent_run_id"


CONFIG_ATTR = "kdsweep_config"


TEACHER_ACCEPTED_TAG = "kdsweep.teacher_accepted"  # a parent run's: why its teacher was refused, and that --accept-teacher overrode it


# --------------------------------------------------------------------------- trial states
# A trial run's STATE_TAG holds the Optuna state its trial ended in (RUNNING while it trains; ORPHANED for
# a run no trial owns). Which state, MLflow status and tag go together is study/outcome.py's table.

STATE_TAG = "kdsweep.state"

REASON_TAG = "kdsweep.reason"

STATE_RUNNING = "RUNNING"

STATE_COMPLETE = "COMPLETE"

STATE_PRUNED = "PRUNED"

STATE_FAIL = "FAIL"

STATE_ORPHANED = "ORPHANED"  # a run that no trial of the study owns (the report skips it)

# MLflow run statuses (mlflow.entities.RunStatus names)

RUN_RUNNING = "RUNNING"

RUN_FINISHED = "FINISHED"

RUN_FAILED = "FAILED"

RUN_KILLED = "KILLED"

# --------------------------------------------------------------------------- teacher runs (experiment "teachers")

TEACHER_KEY_TAG = "kdsweep.teacher_key"  # the teacher's identity: its cache file's name (data, arch, seed, epochs, size)

TEACHER_SHA_TAG = "kdsweep.teacher_sha256"  # the digest of its weights; the run's artifact checkpoint/<file> holds them
