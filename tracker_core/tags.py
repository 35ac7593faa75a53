"""Names of the tags and marker metrics the manager writes, in one place.

Tags are what the manager filters on server-side; the seed's marker metrics
(``model_uploaded``, ``model_deleted``) are logged too, so the model's state stays visible as
a chart in the MLflow UI.
"""

from __future__ import annotations

__all__ = [
    "KIND_INITIAL",
    "KIND_ITERATION",
    "LEASE_CLAIM_PREFIX",
    "METRIC_MODEL_DELETED",
    "METRIC_MODEL_UPLOADED",
    "MODEL_DIR",
    "TAG_BATCH",
    "TAG_DECISION",
    "TAG_HOLDOUT",
    "TAG_KIND",
    "TAG_LEASE",
    "TAG_MODEL_DELETED",
    "TAG_MODEL_FILES",
    "TAG_MODEL_FORMAT",
    "TAG_MODEL_SHA256",
    "TAG_MODEL_UPLOADED",
    "TAG_MODEL_URI",
    "TAG_NOTIFIED",
    "TAG_PARAMS_ID",
    "TAG_PARAMS_TYPE",
    "TAG_PLUGIN",
    "TAG_PROTECTED",
    "TAG_PRUNED",
    "TAG_PRUNED_STEP",
    "TAG_PRUNED_VALUE",
    "TAG_PRUNER_PREFIX",
    "TRUE",
]

TRUE = "true"
FALSE = "false"

TAG_PLUGIN = "tracker.plugin"
TAG_KIND = "tracker.kind"
TAG_BATCH = "tracker.batch_id"
KIND_INITIAL = "initial"
KIND_ITERATION = "iteration"

TAG_PARAMS_ID = "tracker.params_id"
TAG_PARAMS_TYPE = "tracker.params_type"

#: "true" once the model files are completely written; the only thing that makes a model servable
TAG_MODEL_UPLOADED = "tracker.model_uploaded"
TAG_MODEL_DELETED = "tracker.model_deleted"
TAG_MODEL_URI = "tracker.model_uri"
TAG_MODEL_FORMAT = "tracker.model_format"
#: the model's files and sizes (JSON), so a download needs no listing
TAG_MODEL_FILES = "tracker.model_files"
#: the SHA-256 of each of the model's files (JSON), as written (lineage records them)
TAG_MODEL_SHA256 = "tracker.model_sha256"
#: "true" while a registered-model alias (the champion, the rollback model) points at the
#: run's model: no cleanup deletes its model or its iteration (:mod:`tracker_core.promotion`)
TAG_PROTECTED = "tracker.protected"
#: promotion (:mod:`tracker_core.promotion`): a run's or a version's cached holdout score, the
#: decision written on a challenger's run, the idempotency key of the webhook delivered for a
#: version
TAG_HOLDOUT = "tracker.holdout"
TAG_DECISION = "tracker.promotion"
TAG_NOTIFIED = "tracker.notified"

METRIC_MODEL_UPLOADED = "model_uploaded"
METRIC_MODEL_DELETED = "model_deleted"

#: the model's folder below the run's artifact URI, as MLflow's ``runs:/<id>/model``
MODEL_DIR = "model"

#: a run's lease (see :mod:`tracker_core.leases`): the write-once claim param of each epoch
#: is ``LEASE_CLAIM_PREFIX + str(epoch)``, the heartbeat is the tag ``TAG_LEASE``
LEASE_CLAIM_PREFIX = "tracker.lease."
TAG_LEASE = "tracker.lease"

#: a run the search's pruner stopped (see :mod:`tracker_core.pruning`): "true" on a KILLED run,
#: with the step it was stopped at and its intermediate value there
TAG_PRUNED = "tracker.pruned"
TAG_PRUNED_STEP = "tracker.pruned_step"
TAG_PRUNED_VALUE = "tracker.pruned_value"
#: what a pruner keeps about a run between decisions (Optuna's trial system attributes, e.g.
#: successive halving's rungs): ``TAG_PRUNER_PREFIX + key``, the value as JSON
TAG_PRUNER_PREFIX = "tracker.pruner."
