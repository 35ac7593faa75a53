"""The public face of :class:`~tracker_core.manager.ExperimentsManager`, one concept a module.

- :mod:`.iterations`: the initial model, iterations, their deletion, lookups for tools;
- :mod:`.runs`: the run of a params set, its lease, its metrics and quality;
- :mod:`.models`: saving (best only), deleting, best runs and URLs, downloads, top params;
- :mod:`.reconcile`: what ``tracker-core gc`` and ``verify`` repair;
- :mod:`.state`: the state they share, built by the manager's ``__init__``.

Each part holds the seed's names and their checks, and delegates the work to the core module
of its concept (:mod:`tracker_core.iterations`, :mod:`tracker_core.runs`,
:mod:`tracker_core.models`, :mod:`tracker_core.reconcile`, :mod:`tracker_core.ranking`).
"""
