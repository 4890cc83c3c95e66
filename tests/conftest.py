"""Session fixtures for tests on the local stack (started by scripts/test.sh, or here if it is not up)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.settings import Settings, get_settings


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    from pipeline.stack import local

    settings = get_settings()
    local.up(settings)  # idempotent: reuses servers already running
    return settings


@pytest.fixture(scope="session")
def clickhouse(stack_settings: Settings) -> Any:
    from clickhouse_driver import Client

    ch = stack_settings.clickhouse
    return Client(host=ch.host, port=ch.port, user=ch.user, password=ch.password)
