"""More fine-tuning methods for the task-service tests (beside ``_service_methods``).

``svc-pickle`` saves its models in the ``mlflow.pytorch`` format (it pickles the whole model,
and tracker-core says so once per worker); ``svc-stall`` trains each run for ten minutes,
calling ``check_stop`` every step, so a task of it is surely still training when a test
cancels it.
"""

from __future__ import annotations

from _service_methods import _Base


class Pickled(_Base):
    name = "svc-pickle"
    model_format = "mlflow.pytorch"


class Stalled(_Base):
    name = "svc-stall"
    sleep = 600.0


#: the ``--method`` options that offer them
OPTIONS = [
    *("--method", f"{Pickled.name}={__name__}:Pickled"),
    *("--method", f"{Stalled.name}={__name__}:Stalled"),
]
