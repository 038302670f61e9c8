"""Shared test set-up: 8 simulated CPU devices (for sharding tests) and small real data sets."""

import os

# Must happen before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Commands run in-process (bilaf select / run) would otherwise switch JAX's persistent
# compilation cache on for the rest of the session, in the user's home: tests neither read
# programs other processes compiled (a multi-device CPU program read back from that cache has
# crashed JAX) nor leave their own there. Tests of the cache pass their own folder.
os.environ["BILAF_COMPILE_CACHE"] = "off"

import jax  # noqa: E402 - after the flags above
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# JAX's own switch too, whatever a test points the cache at.
jax.config.update("jax_enable_compilation_cache", False)


# The longest test files (by `pytest --durations` on 2 cores), longest first.
# pytest-xdist (scripts/test.sh: -n 2 --dist loadfile --no-loadscope-reorder) deals whole files
# to its workers in collection order; started first, the long files no longer leave one worker
# running alone at the end (it did for 2 of the 13 minutes when files went by test count).
LONGEST_FILES_FIRST = ("test_sharding.py", "test_scripts.py", "test_boundary.py", "test_contract.py",
                       "test_activeft.py", "test_backbones.py", "test_properties.py", "test_sweep.py",
                       "test_pipeline.py", "test_run.py", "test_cli_errors.py", "test_docs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files keep their order


@pytest.fixture(autouse=True)
def _no_compile_cache_afterwards():
    """A test that points the compilation cache somewhere does so for itself only."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        jax.config.update("jax_compilation_cache_dir", before)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 1,797 real 8x8 digit images as 64-d float32 features, and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def fashion_mnist_or_skip():
    """Skip where the Fashion-MNIST IDX files are not installed; any other failure to read
    them is the test's to report."""
    from bilaf_jax import data

    raw = data.raw_data_dir("fashion_mnist", None)
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if not all((raw / name).is_file() for name in names):
        data_missing(f"Fashion-MNIST not installed in {raw} (apt-get install dataset-fashion-mnist)")


def data_missing(message: str):
    """Skip a test whose real data is not installed; fail instead where
    BILAF_TESTS_REQUIRE_DATA is set (CI: its set-up installs the data, so a skip there would
    hide a broken install step)."""
    if os.environ.get("BILAF_TESTS_REQUIRE_DATA"):
        pytest.fail(f"{message} (BILAF_TESTS_REQUIRE_DATA is set)")
    pytest.skip(message)
