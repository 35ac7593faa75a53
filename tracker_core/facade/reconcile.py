"""The manager's reconcile methods, behind ``tracker-core gc`` and ``verify``.

A part of :class:`~tracker_core.manager.ExperimentsManager` (see :mod:`tracker_core.facade`);
the work is done by :mod:`tracker_core.reconcile`.
"""

from __future__ import annotations

import logging

from tracker_core.facade.state import ManagerState
from tracker_core.reconcile import (
    AbandonedTwin,
    MissingModel,
    MissingScan,
    OrphanedModel,
    OrphanedUpload,
    OrphanScan,
)

log = logging.getLogger(__name__)

__all__ = ["ReconcileAPI"]


class ReconcileAPI(ManagerState):
    """What crashes and outside hands leave: find it, repair it."""

    # ------------------------------------------------------------------ reconcile (gc, verify)
    def find_orphaned_models(
        self, *, include_running: bool = False, max_depth: int = 4
    ) -> OrphanScan:
        """Model folders no run marks and incomplete uploads whose writer is gone: what
        crashes leave (see :meth:`Reconciler.find_orphans`)."""
        return self._reconcile.find_orphans(
            include_running=include_running, max_depth=max_depth, lease_seconds=self.lease_seconds
        )

    def delete_orphaned_model(self, orphan: OrphanedModel) -> bool:
        """Delete one folder found by :meth:`find_orphaned_models`; True when it is gone."""
        return self._reconcile.delete_orphan(orphan)

    def abort_orphaned_upload(self, upload: OrphanedUpload) -> None:
        """Abort one incomplete upload found by :meth:`find_orphaned_models`."""
        self._reconcile.abort_upload(upload)

    def delete_abandoned_twin(self, twin: AbandonedTwin) -> bool:
        """Delete a run of :attr:`OrphanScan.twins` if it is still abandoned; True if deleted."""
        return self._reconcile.delete_twin(twin, lease_seconds=self.lease_seconds)

    def find_models_missing_files(self) -> MissingScan:
        """Runs marked as holding a model whose files are gone (``tracker-core verify``)."""
        return self._reconcile.find_missing_files(lease_seconds=self.lease_seconds)

    def unmark_model_missing_files(self, model: MissingModel) -> bool:
        """Unmark a run found by :meth:`find_models_missing_files` as a deletion would."""
        return self._reconcile.unmark_missing(model, lease_seconds=self.lease_seconds)
