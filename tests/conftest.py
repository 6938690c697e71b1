"""Shared fixtures: the real data in ../shared/data when present, skipped with the reason when not."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FLAXLAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data():
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set FLAXLAB_SHARED_DATA); this test needs full MNIST")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mnist_sample():
    from flaxlab import data
    return data.load_mnist(source="sample")


@pytest.fixture(scope="session")
def mnist_full(shared_data):
    from flaxlab import data
    return data.load_mnist(source="files", data_dir=shared_data / "mnist")


def small_dataset(dataset, num_train, num_test):
    """The first examples of a dataset: enough for engine tests, small enough for a 2-core CI."""
    from flaxlab import data
    return data.Dataset(dataset.name, dataset.source + f"[:{num_train}]",
                        data.Split(dataset.train.images[:num_train], dataset.train.labels[:num_train]),
                        data.Split(dataset.test.images[:num_test], dataset.test.labels[:num_test]),
                        dataset.num_classes)
