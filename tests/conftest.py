"""Shared pytest fixtures: real redis-server instances, the anyio backend, and the scripts as modules."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

# Test helper modules (redis_server, rq_jobs) are imported by plain name, and rq workers
# import job functions by dotted path, so the tests directory must be importable.
TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

# The one real smoke campaign that test_campaign_e2e.py and test_report.py both read: a session
# fixture registered here, once, so that it runs once per session (a test module importing it
# itself would get its own instance and a second campaign).
from envfixtures import prepared_data, smoke_campaign  # noqa: E402, F401

from pipeline.redis_server import RedisServer  # noqa: E402


@pytest.fixture
def load_script() -> Callable[[str], ModuleType]:
    """A script of scripts/ (say "bench_offline") loaded as a module: scripts/ is not a package."""

    def load(name: str) -> ModuleType:
        path = Path(TESTS_DIR).parent / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def anyio_backend() -> str:
    # redis.asyncio runs on asyncio only (not trio).
    return "asyncio"


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Start fresh redis-servers (``appendonly=True`` for durability tests); all are killed at teardown."""
    servers: list[RedisServer] = []

    def start(appendonly: bool = False) -> RedisServer:
        try:
            server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=appendonly)
            servers.append(server)
            return server.start()
        except RuntimeError as exc:
            error = str(exc)
        # Failed (never skipped) outside the except block, so the report is one clear line.
        pytest.fail(error, pytrace=False)

    yield start
    for server in servers:
        server.stop(hard=True)


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A private, empty redis-server (no persistence) for one test."""
    return redis_factory()
