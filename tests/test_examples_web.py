"""The web examples: an HTTP fan-out with httpx and hypercorn, and a Flask app.

They need the ``examples`` extra (``pip install -e '.[trio,examples]'``); without it these
tests are skipped, so the default test run stays light. Every server is started by the
example itself on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from .test_examples import EXAMPLES, run_program, succeeded

# 2,000 requests through Python on both ends take a few seconds; more on a busy machine.
PROGRAM_TIMEOUT = 180


@pytest.fixture(params=["asyncio", "trio"])
def web_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "trio":
        pytest.importorskip("trio")
    return str(request.param)


def load_example(name: str) -> ModuleType:
    """Import ``examples/NAME.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- HTTP fan-out ----------------------------------------------------------------------------


@pytest.mark.timeout(PROGRAM_TIMEOUT + 30)
def test_http_fanout_example(web_backend: str) -> None:
    pytest.importorskip("httpx")
    pytest.importorskip("hypercorn")
    result = run_program(
        str(EXAMPLES / "http_fanout.py"),
        "--backend",
        web_backend,
        "--workers",
        "2",
        timeout=PROGRAM_TIMEOUT,
    )
    lines = succeeded(result).splitlines()
    assert re.fullmatch(
        rf"server: hypercorn \({web_backend}\) on http://127\.0\.0\.1:\d+", lines[0]
    ), lines[0]
    assert lines[1].startswith(f"backend: {web_backend}, 2 workers, 2000 URLs")
    assert lines[2] == "fetched: 2000, expected answers: 2000"
    # One client per worker, each used from its own loop; round robin splits evenly.
    assert lines[3] == "requests per client: fetcher-0: 1000, fetcher-1: 1000"
    assert re.fullmatch(r"elapsed: \d+\.\d\d s \([\d,]+ requests/s\)", lines[4]), lines[4]
    assert lines[-1] == "all checks passed"


# -- Flask -----------------------------------------------------------------------------------

LATENCY = 0.2


@pytest.fixture(scope="module")
def flask_app_module() -> ModuleType:
    pytest.importorskip("flask")
    return load_example("flask_app")


@pytest.fixture
def flask_app(flask_app_module: ModuleType, web_backend: str) -> Iterator[Any]:
    app = flask_app_module.create_app(backend=web_backend, workers=2, latency=LATENCY, timeout=0.5)
    try:
        yield app
    finally:
        flask_app_module.close_app(app)


def test_flask_view_runs_async_code_concurrently(flask_app: Any) -> None:
    response = flask_app.test_client().get("/weather?cities=paris,oslo,lima")
    assert response.status_code == 200
    body = response.get_json()
    assert body["temperatures"] == {"paris": 14, "oslo": 3, "lima": 19}
    assert body["loop"].startswith("flask-pool-")
    # Three upstream calls at once in one loop: about one latency, not three.
    assert LATENCY - 0.01 <= body["elapsed"] < 3 * LATENCY


def test_flask_view_maps_results_to_status_codes(flask_app: Any) -> None:
    client = flask_app.test_client()
    assert client.get("/weather").status_code == 400
    missing = client.get("/weather?cities=paris,atlantis")
    assert missing.status_code == 404
    assert missing.get_json() == {"unknown": ["atlantis"]}


def test_flask_requests_from_many_threads_share_one_pool(flask_app: Any) -> None:
    pool = flask_app.extensions["portal_pool"]
    statuses: list[int] = []
    lock = threading.Lock()

    def get() -> None:
        status = flask_app.test_client().get("/weather?cities=quito").status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=get) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 6
    assert pool.stats().completed == 6
    assert len(pool.workers) == 2  # no pool per request


def test_flask_timeout_cancels_the_running_task(
    flask_app_module: ModuleType, flask_app: Any
) -> None:
    pool = flask_app.extensions["portal_pool"]
    upstreams = [worker.context for worker in pool.workers]
    response = flask_app.test_client().get("/report?seconds=30")
    assert response.status_code == 504
    flask_app_module.close_app(flask_app)  # waits for the cancelled task's clean-up
    assert sum(upstream.abandoned for upstream in upstreams) == 1
    assert pool.stats().cancelled == 1


def test_flask_app_owns_its_pool(flask_app_module: ModuleType, flask_app: Any) -> None:
    pool = flask_app.extensions["portal_pool"]
    assert flask_app.test_client().get("/stats").get_json()["workers"][0]["index"] == 0
    flask_app_module.close_app(flask_app)
    flask_app_module.close_app(flask_app)  # only once, whoever calls it
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(print)


def test_flask_example_program(web_backend: str) -> None:
    pytest.importorskip("flask")
    result = run_program(
        str(EXAMPLES / "flask_app.py"), "--backend", web_backend, timeout=PROGRAM_TIMEOUT
    )
    lines = succeeded(result).splitlines()
    assert lines[0] == f"backend: {web_backend}, 2 workers, upstream latency 0.2 s"
    assert "GET /weather?cities=paris,atlantis -> 404 {'unknown': ['atlantis']}" in lines
    assert "GET /report?seconds=30 -> 504 after 0.5" in "\n".join(lines)
    assert "cancelled upstream calls cleaned up: 1" in lines
    assert lines[-1] == "all checks passed"


def test_examples_are_importable_without_running() -> None:
    # Importing must not start servers or pools: both examples do everything in main().
    pytest.importorskip("flask")
    pytest.importorskip("httpx")
    pytest.importorskip("hypercorn")
    before = threading.active_count()
    for name in ("flask_app", "http_fanout"):
        module = load_example(name)
        assert callable(module.main)
        sys.modules.pop(name, None)
    assert threading.active_count() == before
