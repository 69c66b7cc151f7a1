import pytest

from harness import Host


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    return Host(tmp_path_factory.mktemp("comfy_base"))
