"""Backends are plug-ins found through entry points: a distribution installed only for this
test is picked up by ``tracker_core.connect`` with no change to the core; a known scheme whose
distribution is missing names the distribution to install."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _s3gcs_fixtures import same_weights, tiny_model

import tracker_core
from tracker_core import registry
from tracker_core.errors import BackendNotInstalledError, UnknownSchemeError
from tracker_core.testing.harness import FAST_RETRY, fresh_sqlite_uri

PLUGIN = Path(__file__).parent / "plugins" / "tracker_core_memory_backend"


def _pip_install(target: Path, workdir: Path) -> None:
    """Install the plug-in distribution (no dependencies, no index) into ``target``, building
    from a copy so the source tree gets no build/ or egg-info droppings."""
    source = workdir / PLUGIN.name
    shutil.copytree(
        PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
            "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
            str(source),
        ],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def plugin_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    _pip_install(target, tmp_path_factory.mktemp("src"))
    assert list(target.glob("tracker_core_memory_backend-*.dist-info"))
    return target


@pytest.fixture
def installed_plugin(plugin_target: Path) -> Iterator[Path]:
    """The plug-in importable and its entry point visible, for this test only."""
    sys.path.insert(0, str(plugin_target))
    importlib.invalidate_caches()
    try:
        yield plugin_target
    finally:
        sys.path.remove(str(plugin_target))
        importlib.invalidate_caches()
        sys.modules.pop("tracker_core_memory", None)
        with registry._lock:  # forget the loaded backend: it is uninstalled again
            registry._loaded.pop("memory", None)


def test_memory_scheme_is_unknown_before_installing(tmp_path: Path) -> None:
    assert "memory" not in tracker_core.available_schemes()
    with pytest.raises(UnknownSchemeError, match="memory") as info:
        tracker_core.connect(
            "memory://x", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
            main_metric="q", plugin_name="p",
        )  # fmt: skip
    assert "s3" in str(info.value)  # lists the installed schemes


def test_connect_picks_up_a_backend_installed_from_its_own_distribution(
    installed_plugin: Path, tmp_path: Path
) -> None:
    eps = {
        ep.name: ep.value for ep in importlib.metadata.entry_points(group="tracker_core.backends")
    }
    assert eps["memory"] == "tracker_core_memory:MemoryBackend"
    assert "memory" in tracker_core.available_schemes()
    manager = tracker_core.connect(
        "memory://x/models",
        tracking_uri=fresh_sqlite_uri(tmp_path),
        main_metric="quality",
        plugin_name="third-party",
        retry=FAST_RETRY,
        model_factory=tiny_model,
    )
    assert type(registry.get_backend("memory")).__module__ == "tracker_core_memory"
    assert manager.artifacts.root == "memory://x/models"
    assert manager.model_format == "state_dict"
    assert manager.upload_initial_model(tiny_model()) is True
    assert same_weights(manager.download_initial_model(), tiny_model())
    run_id = manager.get_initial_model_run_id()
    assert run_id is not None
    run = manager.get_run_by_id(run_id)
    assert run is not None and run.artifact_uri.startswith("memory://x/models/")


def test_the_plugin_passes_the_artifact_contract_and_a_behaviour_smoke(
    plugin_target: Path, tmp_path: Path
) -> None:
    """The plug-in's own test file supplies the ``artifact_backend`` and ``backend`` fixtures
    and imports the shipped artifact-store contract and a few behaviour tests (run in a
    process where the plug-in is installed, and nothing of this repo's tests)."""
    pytest.importorskip("tracker_core.testing.contract_artifacts")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(plugin_target), os.environ.get("PYTHONPATH", "")]),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    }
    out = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "--rootdir", str(PLUGIN), "--confcutdir", str(PLUGIN),
            "-c", str(PLUGIN / "pyproject.toml"),
            str(PLUGIN / "tests" / "memory_suite.py"),
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_known_scheme_without_its_distribution_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``s3`` is known to the core; with no entry point for it, the error names the
    distribution to install (simulated: the s3 entry point hidden from discovery)."""
    real = registry._entry_points
    monkeypatch.setattr(
        registry, "_entry_points", lambda: {k: v for k, v in real().items() if k != "s3"}
    )
    monkeypatch.setattr(
        registry, "_loaded", {k: v for k, v in registry._loaded.items() if k != "s3"}
    )
    with pytest.raises(BackendNotInstalledError, match="pip install tracker-core-s3") as info:
        registry.get_backend("s3")
    assert isinstance(info.value, ImportError)  # what `except ImportError` callers expect


def test_s3_not_installed_in_a_fresh_process(tmp_path: Path) -> None:
    """For real: a process in which the tracker-core-s3 distribution is not visible."""
    code = r"""
import importlib.metadata as md, sys
real = md.entry_points
def entry_points(**kw):
    eps = real(**kw)
    return md.EntryPoints(ep for ep in eps if ep.value.split(":")[0] != "tracker_core_s3")
md.entry_points = entry_points
sys.modules["tracker_core_s3"] = None  # and the package not importable
import tracker_core
try:
    tracker_core.connect(
        "s3://bucket/p", tracking_uri="sqlite:///x.db", main_metric="q", plugin_name="p"
    )
except tracker_core.BackendNotInstalledError as exc:
    print("HINT:", exc)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert "HINT:" in out.stdout, out.stderr[-2000:]
    assert "pip install tracker-core-s3" in out.stdout
