"""Test setup: 8 fake CPU devices so that every test exercises sharding; TensorFlow kept off GPUs."""

import os
import sys

# configs/ is a folder of config files, not an installed package: make `import configs.clip` work.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Must happen before jax initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests that take more than ~20 s")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
  """A TFDS data_dir holding the embedded demo dataset, built once per test session (~20 s).

  Set XCLIP_TEST_DATA_DIR=<data_dir> to reuse a prepared one (e.g. the demo run's).
  """
  from xclip_jax.data import datasets
  data_dir = os.environ.get("XCLIP_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  datasets.prepare_dataset("xclip_demo", data_dir, builtin=True)
  return data_dir
