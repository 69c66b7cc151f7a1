import pytest

from harness import Host


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture
def fresh(host):
    """A fresh executor (no node outputs cached) and an empty adapter cache."""
    host.new_executor()
    host.lc.purge()
    yield host
    host.lc.purge()
