"""The multi-host test runs only on the cluster scripts/with-cluster.sh builds (make
test-cluster, and its short version in make test); elsewhere it is skipped, as it needs the
namespaces' hosts."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CLUSTER_APP_NETNS"):
        return
    skip = pytest.mark.skip(reason="needs scripts/with-cluster.sh: make test-cluster")
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)
