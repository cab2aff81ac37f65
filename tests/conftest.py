import pytest

from brainvq.data.demo import make_demo_cohort


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A 2/1/1-case demo cohort (64/32/32 slices), made once per test session."""
    folder = tmp_path_factory.mktemp("cohort") / "demo"
    make_demo_cohort(folder, train_cases=2, val_cases=1, test_cases=1, seed=3)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep the decoded-slice cache out of the user's home folder."""
    monkeypatch.setenv("BRAINVQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
