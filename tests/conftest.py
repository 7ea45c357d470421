"""Shared fixtures: one pretrained tiny CLIP per session (cached), tiny random models, and Ray.

The pretrained ``tiny-clip`` is the embedded default model. Its first use in a
fresh environment pretrains it (about 8 minutes on 2 CPU cores) into
``$MAVA_CACHE_DIR``; every later test session loads it from there. On such a new
machine the session pretrains ``tiny-clip`` and ``tiny-mlm`` in a background
process from its start, and runs the tests that need them after the others
(``needs_embedded``): the suite's idle time (servers, subprocesses, retries)
hides most of the pretraining. A test that needs a model before it is ready
waits on the cache's lock (``trainables.models.tiny_clip.first_use_lock``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# MLflow's telemetry thread deletes an environment variable while HTTP requests read the environment
# (a random KeyError: '_MLFLOW_TELEMETRY_SESSION_ID' against a tracking server); nothing here needs it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def pretrained_tiny_clip():
    """The embedded default model (pretrained once per machine and cached). Do not mutate: copy it."""
    from trainables.models import load_model

    return load_model("tiny-clip")


@pytest.fixture()
def tiny_clip(pretrained_tiny_clip):
    """A private deep copy of the pretrained tiny CLIP that a test may train or modify."""
    import copy

    return copy.deepcopy(pretrained_tiny_clip)


@pytest.fixture(scope="session")
def random_tiny_clip_weights(tmp_path_factory) -> Path:
    """A safetensors file of the tiny architecture with random weights (fast model-loading tests)."""
    from safetensors.torch import save_file

    from trainables.models.tiny_clip import build_tiny_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random-tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny_clip().state_dict().items()}, str(path))
    return path


@pytest.fixture()
def random_tiny_clip(random_tiny_clip_weights):
    """The tiny architecture with random (untrained) weights, loaded through the model-spec path."""
    from trainables.models import load_model

    return load_model(f"tiny-clip@{random_tiny_clip_weights}")


@pytest.fixture(scope="session")
def synthetic_test_set():
    """100 test images of the synthetic world at the tiny CLIP's 32 px."""
    from trainables.data.synthetic import SyntheticWorld

    return SyntheticWorld("test", 100, image_size=32, seed=0)


# Tests that take the session's shared Ray down (they need a Ray of their own) run after every other test that
# uses Ray: after them, every later user of `ray_session` or `run_sweep` paid for starting Ray again (15-20 s each
# on 2 cores), and `ray_session` (set up once) does not start it again.
TAKES_RAY_DOWN = ("tests/test_multinode.py::", "tests/test_sweep.py::test_ray_job_submit_runs_a_sweep_on_a_cluster")


# The tests that need the pretrained tiny-clip or tiny-mlm are those that use this fixture, directly or through
# `tiny_clip`: with both models' cache locks made unusable, exactly these 32 tests failed (2026-12-04). The others
# load random weights (`tiny-clip@<file>`) or the tiny ALBEF's random-initialised classes.
EMBEDDED_FIXTURE = "pretrained_tiny_clip"


def needs_embedded(item) -> bool:
    return EMBEDDED_FIXTURE in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    # The rest, then TAKES_RAY_DOWN, then the tests that need the embedded models (they use no Ray; the more
    # time the background pretraining has, the less they wait). Stable: within each group the order is kept.
    items.sort(key=lambda item: (needs_embedded(item), item.nodeid.startswith(TAKES_RAY_DOWN)))


# Lowest priority (nice 19), one thread: it takes only the CPU time the tests leave idle (waits on servers,
# subprocesses, Ray start-up). At normal priority it took 903 s and slowed the other tests by about 200 s in all.
# Its bytes differ from a 2-thread pretraining's, as any two machines' may (trainables.models.embedded); the tests
# assert behaviour, not bytes.
PRETRAIN_EMBEDDED = """
import os
import time
import torch
os.nice(19)
torch.set_num_threads(1)
from trainables.models.tiny_clip import ensure_pretrained
from trainables.models.tiny_mlm import ensure_tiny_mlm
for name, ensure in (("tiny-clip", ensure_pretrained), ("tiny-mlm", ensure_tiny_mlm)):  # the long one first
    started = time.perf_counter()
    print(name, ensure(progress=False), f"{time.perf_counter() - started:.0f} s", flush=True)
"""
BACKGROUND: dict[str, object] = {}


def embedded_models_cached() -> bool:
    from trainables.models.tiny_clip import cached_weights_path
    from trainables.models.tiny_mlm import cached_mlm_path

    return cached_weights_path().is_file() and (cached_mlm_path() / "config.json").is_file()


def pytest_collection_finish(session):
    if not any(needs_embedded(item) for item in session.items) or embedded_models_cached():
        return
    log = tempfile.NamedTemporaryFile("w", prefix="mava-pretraining-", suffix=".log", delete=False)
    # `python -c` puts its working directory, the repository root, first on sys.path
    BACKGROUND.update(process=subprocess.Popen([sys.executable, "-c", PRETRAIN_EMBEDDED], cwd=REPO_ROOT,
                                               stdout=log, stderr=subprocess.STDOUT),
                      log=Path(log.name))
    log.close()  # the child holds its own descriptor


def pytest_terminal_summary(terminalreporter):
    process = BACKGROUND.get("process")
    if process is None:
        return
    state = "finished"
    if process.poll() is None:  # the session ended before any test waited for it (-x, a keyboard interrupt)
        process.terminate()
        process.wait()
        state = "stopped unfinished"
    terminalreporter.write_sep("-", f"embedded models pretrained in a background process (one thread): {state}, exit code {process.returncode}")
    for line in BACKGROUND["log"].read_text().splitlines()[-5:]:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by the tests (starting Ray costs seconds); started on first use.

    No shutdown here: the job-submit test disconnects it before it starts (and `ray stop
    --force`s) a separate head node, tests/test_multinode.py before it starts a
    ``ray.cluster_utils.Cluster`` (both run last: ``TAKES_RAY_DOWN``), and `run_sweep`
    starts Ray again if a later test needs it. Ray shuts itself down when the test process exits.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=True, log_to_driver=False)
    yield


@pytest.fixture(scope="session")
def fake_sweeps_store(tmp_path_factory) -> str:
    """A SQLite MLflow store holding experiments ``captions``, ``retrieval`` and ``mixed`` (tests/fake_sweeps.py); no Ray."""
    from fake_sweeps import write_experiments

    root = tmp_path_factory.mktemp("fake-sweeps")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    write_experiments(uri, str(root / "artifacts"))
    return uri


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing (CI runs as root with Debian mirrors)."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("chromium is not installed and installing it needs root: run apt-get install -y chromium")
    result = subprocess.run("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium", shell=True,
                            capture_output=True, text=True, timeout=1800)
    found = shutil.which("chromium")
    if result.returncode != 0 or not found:
        pytest.fail(f"could not install chromium (apt-get exit code {result.returncode}); install it with "
                    f"`apt-get update && apt-get install -y chromium`:\n{(result.stdout + result.stderr)[-2000:]}")
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # A private profile: concurrent Chromium runs on one machine otherwise fight over the default one.
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    # 300 s: on a busy 2-core machine one MLflow UI page (a React app, 30 s of virtual time) took over 180 s.
    return subprocess.run(command, capture_output=True, text=True, timeout=300)
