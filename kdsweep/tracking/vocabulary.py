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
