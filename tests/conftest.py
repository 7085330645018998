"""Test setup: 8 fake CPU devices so that every test exercises sharding; TensorFlow kept off GPUs."""

import fcntl
import functools
import os
import shutil
import sys
import tempfile

# configs/ is a folder of config files, not an installed package: make `import configs.clip` work.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Must happen before jax initialises its backend. LLVM's optimisation level 0 for the CPU code XLA
# emits: tiny test programs compile ~40% faster and run no slower that matters; XLA's own HLO
# passes (fusion, sharding, layout) are unchanged, and so are the floating-point semantics.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0"
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache per test run, shared by the xdist workers and every subprocess
# they start (the multi-process drills run the same programs again and again): a program compiled
# once is loaded, not recompiled. Executables are the same bits, so results are unchanged.
# (The xdist workers inherit the controller's environment, so all of them get its directory.)
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ    # False in the workers: inherited
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"xclip_jax_tests_{os.getpid()}", "jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests that take more than ~20 s")


def pytest_unconfigure(config):
  """The run that made the compilation cache removes it (the workers have ended by then)."""
  if _OWN_CACHE:
    shutil.rmtree(os.path.dirname(os.environ["JAX_COMPILATION_CACHE_DIR"]), ignore_errors=True)


# The longest files first (multi-process drills, SIGTERM/SIGKILL runs, end-to-end training):
# pytest-xdist's loadfile hands files out in collection order, so these then run beside the many
# short files instead of after them. The order within a file is kept.
LONGEST_FILES = ("test_preemption.py", "test_multihost.py", "test_reliability.py",
                 "test_train.py", "test_tracking.py", "test_ema.py", "test_interop.py",
                 "test_api.py", "test_declip_model.py", "test_convert.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  """A TFDS data_dir holding the embedded demo dataset, built once per test run (~20 s): under
  pytest-xdist the workers share one, built by whichever asks first (the others wait on a lock).

  Set XCLIP_TEST_DATA_DIR=<data_dir> to reuse a prepared one (e.g. the demo run's).
  """
  from xclip_jax.data import datasets
  if os.environ.get("XCLIP_TEST_DATA_DIR"):
    data_dir = os.environ["XCLIP_TEST_DATA_DIR"]
    datasets.prepare_dataset("xclip_demo", data_dir, builtin=True)
    return data_dir
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):    # each worker's basetemp is under the run's
    root = root.parent
  with open(root / "tfds_demo.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    datasets.prepare_dataset("xclip_demo", str(root / "tfds_demo"), builtin=True)
  return str(root / "tfds_demo")


@pytest.fixture
def tiny_config(demo_dir):
  """tests/tiny.py's tiny_config bound to the demo data: tiny_config(**overrides)."""
  from tests import tiny
  return functools.partial(tiny.tiny_config, demo_dir)
