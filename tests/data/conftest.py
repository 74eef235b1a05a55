import pytest

from kdq.data import Dataset, load_dataset


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
    """A data dir holding the built digits dataset, shared by the whole session."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    load_dataset("digits", data_dir=data_dir)
    return data_dir


@pytest.fixture
def digits(digits_data_dir) -> Dataset:
    return load_dataset("digits", data_dir=digits_data_dir)
