"""``MLflowClientWrapper``: the seed API's entry point, kept for people coming from it.

It holds the connection settings that ``ExperimentsManager.from_wrapper`` reuses:
``tracking_uri``, ``requirements`` (extra pip requirements recorded with saved models) and
``retry_config``. No global MLflow state is touched.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from tracker_core import arguments
from tracker_core.retry import RetryConfig
from tracker_core_mlflow.opening import check_tracking_uri
from tracker_core_mlflow.tracking import MlflowTrackingStore

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["MLflowClientWrapper"]


class MLflowClientWrapper:
    """An ``MlflowClient`` for ``tracking_uri`` plus the settings a manager inherits."""

    def __init__(
        self,
        tracking_uri: str,
        requirements: list[str] | None = None,
        retry_config: RetryConfig | None = None,
    ) -> None:
        check_tracking_uri(arguments.text("tracking_uri", tracking_uri))
        arguments.optional_instance("retry_config", retry_config, RetryConfig, "a RetryConfig")
        self.tracking_uri = tracking_uri
        self.requirements: list[str] = arguments.string_list("requirements", requirements) or []
        self.retry_config: RetryConfig = retry_config or RetryConfig()

    @functools.cached_property
    def tracking_store(self) -> MlflowTrackingStore:
        """The tracking store over :attr:`client` (created on first use)."""
        return MlflowTrackingStore(self.tracking_uri)

    @property
    def client(self) -> MlflowClient:
        """The ``MlflowClient`` for :attr:`tracking_uri`."""
        return self.tracking_store.client

    def __repr__(self) -> str:
        return f"MLflowClientWrapper({self.tracking_store.display_uri!r})"
