"""Calls and outcomes as bytes for a worker process: by reference, by value, and the errors
that name what could not be sent."""

from __future__ import annotations

import os
import pickle
import pickletools
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from portal_pool._pickling import decode_call, decode_outcome, encode_call, encode_outcome

ROOT = Path(__file__).resolve().parents[1]


async def add(a: int, b: int) -> int:
    return a + b


def failing_task() -> None:
    raise ValueError("boom")


class Unsendable:
    """Refuses pickling as ``PortalPool`` does, with a message of its own."""

    def __reduce__(self) -> Any:
        raise TypeError("a PortalPool cannot be sent to a worker")


class FlakyReduce:
    """Fails to pickle the first ``failures`` times only: no part alone is at fault."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __reduce__(self) -> Any:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("flaky")
        return FlakyReduce, (0,)


class BadInit(Exception):
    """Pickles, but unpickling calls ``BadInit("boom")``, which lacks ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class LockedError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


def run_python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that imports this worktree's portal_pool."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
        cwd=cwd,
    )


def raised(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as exc:
        return exc
    raise AssertionError("did not raise")


# -- calls ------------------------------------------------------------------------------


def test_module_function_goes_by_reference() -> None:
    blob = encode_call(add, (1, 2), {"b": 3})
    opcodes = [op.name for op, _, _ in pickletools.genops(blob)]
    assert "STACK_GLOBAL" in opcodes
    assert b"cloudpickle" not in blob
    fn, args, kwargs = decode_call(blob)
    assert fn is add  # by value would have made a new function
    assert (args, kwargs) == ((1, 2), {"b": 3})


def test_lambda_closure_and_local_function_go_by_value_to_a_fresh_process(
    tmp_path: Path,
) -> None:
    offset = 10

    def double(x: int) -> int:
        return 2 * x

    def shifted(x: int) -> int:
        return x + offset

    blobs = [
        encode_call(lambda x: x - 1, (5,), {}),
        encode_call(shifted, (5,), {}),
        encode_call(double, (), {"x": 5}),
        encode_call(add, (1, 2), {}),  # the control: by reference, so not found there
    ]
    (tmp_path / "calls").write_bytes(pickle.dumps(blobs))
    code = (
        "import pickle, sys\n"
        "sys.modules['tests'] = None  # the test module can't be imported: only by value works\n"
        "from portal_pool._pickling import decode_call\n"
        "for blob in pickle.loads(open('calls', 'rb').read()):\n"
        "    try:\n"
        "        fn, args, kwargs = decode_call(blob)\n"
        "    except TypeError as error:\n"
        "        print(type(error.__cause__).__name__)\n"
        "    else:\n"
        "        print(fn(*args, **kwargs))\n"
    )
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "15", "10", "ModuleNotFoundError"]


def test_main_function_and_class_go_by_value_to_a_fresh_process(tmp_path: Path) -> None:
    encoder = (
        "import pickle, threading\n"
        "from portal_pool._pickling import encode_call\n"
        "class Point:\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n"
        "def total(point, scale):\n"
        "    return scale * (point.x + point.y)\n"
        "lock = threading.Lock()\n"
        "def locked():\n"
        "    with lock:\n"
        "        return 1\n"
        "open('call', 'wb').write(encode_call(total, (Point(3, 4),), {'scale': 2}))\n"
        "# by value can't take the global lock: by reference, for a child that runs this\n"
        "# script, as multiprocessing's spawn and forkserver do\n"
        "print(pickle.loads(encode_call(locked, (), {}))[0] is locked)\n"
    )
    decoder = (
        "from portal_pool._pickling import decode_call\n"
        "fn, args, kwargs = decode_call(open('call', 'rb').read())\n"
        "print(fn(*args, **kwargs), type(args[0]).__name__)\n"
    )
    encoded = run_python(encoder, cwd=tmp_path)
    assert encoded.returncode == 0, encoded.stderr
    assert encoded.stdout.split() == ["True"]
    decoded = run_python(decoder, cwd=tmp_path)
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout.split() == ["14", "Point"]


def test_lambda_round_trip_in_process() -> None:
    blob = encode_call(lambda x, *, y: x * y, (6,), {"y": 7})
    assert b"cloudpickle" in blob
    fn, args, kwargs = decode_call(blob)
    assert fn(*args, **kwargs) == 42


@pytest.mark.parametrize(
    ("args", "kwargs", "label"),
    [
        ((1, threading.Lock()), {}, r"args\[1\]"),
        ((1,), {"timeout": threading.Lock()}, r"kwargs\['timeout'\]"),
    ],
)
def test_unpicklable_argument_is_named(args: Any, kwargs: Any, label: str) -> None:
    with pytest.raises(TypeError, match=label) as info:
        encode_call(add, args, kwargs)
    message = str(info.value)
    assert message.startswith(f"cannot send {label.replace(chr(92), '')} to a worker process")
    assert "a _thread.lock object cannot be pickled (cannot pickle '_thread.lock' object)" in (
        message
    )
    assert "create the object inside the task" in message
    assert isinstance(info.value.__cause__, TypeError)
    assert "_thread.lock" in str(info.value.__cause__)


def test_unpicklable_callable_is_named() -> None:
    lock = threading.Lock()

    def holds_lock() -> bool:  # a local function, by value: its closure holds the lock
        return lock.locked()

    exc = raised(lambda: encode_call(holds_lock, (1, 2), {"x": 3}))
    assert isinstance(exc, TypeError)
    assert str(exc).startswith(
        "cannot send the callable to a worker process: a function object cannot be pickled "
        "(cannot pickle '_thread.lock' object)"
    )
    assert exc.__cause__ is not None


def test_own_reduce_message_is_kept() -> None:
    with pytest.raises(TypeError, match="a PortalPool cannot be sent to a worker") as info:
        encode_call(add, (1,), {"pool": Unsendable()})
    assert "kwargs['pool']" in str(info.value)
    assert "tests.test_pickling.Unsendable" in str(info.value)
    assert str(info.value.__cause__) == "a PortalPool cannot be sent to a worker"


def test_whole_call_is_named_when_no_part_fails_alone() -> None:
    exc = raised(lambda: encode_call(add, (FlakyReduce(2),), {}))
    assert isinstance(exc, TypeError)
    assert str(exc).startswith("cannot send the call to a worker process: it cannot be pickled")
    assert str(exc.__cause__) == "flaky"


def test_decode_call_of_bad_bytes_says_so() -> None:
    with pytest.raises(TypeError, match="the worker process could not unpickle the call"):
        decode_call(b"not a pickle")


# -- outcomes ---------------------------------------------------------------------------


def test_result_round_trip() -> None:
    assert decode_outcome(encode_outcome(True, {"answer": [42]})) == (True, {"answer": [42]})


def test_lambda_result_goes_by_value() -> None:
    ok, result = decode_outcome(encode_outcome(True, lambda: "hi"))
    assert ok
    assert callable(result)
    assert result() == "hi"


def test_unpicklable_result_becomes_an_error() -> None:
    ok, exc = decode_outcome(encode_outcome(True, (n for n in range(3))))
    assert not ok
    assert isinstance(exc, TypeError)
    assert str(exc).startswith(
        "the task's result, a generator object, cannot be pickled to return it from the "
        "worker process: cannot pickle 'generator' object"
    )


def test_exception_comes_back_with_remote_traceback() -> None:
    original = raised(failing_task)
    ok, exc = decode_outcome(encode_outcome(False, original))
    assert not ok
    assert type(exc) is ValueError
    assert exc is not original
    assert isinstance(exc, ValueError)
    assert exc.args == ("boom",)
    cause = str(exc.__cause__)
    assert "Traceback (most recent call last)" in cause
    assert "in failing_task" in cause
    assert 'raise ValueError("boom")' in cause


def test_exception_of_a_local_class_comes_back_as_that_class() -> None:
    class LocalError(Exception):
        pass

    ok, exc = decode_outcome(encode_outcome(False, LocalError("here")))
    assert not ok
    assert isinstance(exc, LocalError)
    assert str(exc) == "here"


def test_unpicklable_exception_is_named() -> None:
    ok, exc = decode_outcome(encode_outcome(False, LockedError("stuck")))
    assert not ok
    assert isinstance(exc, TypeError)
    assert str(exc).startswith(
        "the task raised an exception that cannot be pickled to return it from the worker "
        "process: tests.test_pickling.LockedError: stuck (cannot pickle '_thread.lock' object)"
    )
    assert "LockedError: stuck" in str(exc.__cause__)


def test_exception_that_cannot_be_unpickled_is_named() -> None:
    def task() -> None:
        raise BadInit("boom", 3)

    ok, exc = decode_outcome(encode_outcome(False, raised(task)))
    assert not ok
    assert isinstance(exc, TypeError)
    message = str(exc)
    assert message.startswith(
        "the task raised an exception that could not be unpickled in the parent process: "
        "tests.test_pickling.BadInit: boom (TypeError: "
    )
    assert "missing 1 required positional argument: 'code'" in message
    assert "in task" in str(exc.__cause__)


def test_exception_with_failing_str_and_unpicklable_state() -> None:
    original = BadStr()
    original.lock = threading.Lock()  # type: ignore[attr-defined]
    ok, exc = decode_outcome(encode_outcome(False, original))
    assert not ok
    assert isinstance(exc, TypeError)
    assert "tests.test_pickling.BadStr: <BadStr, whose str() failed>" in str(exc)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"garbage",
        pickle.dumps(42),
        pickle.dumps((True,)),
        pickle.dumps((False, b"not a pickle", "x.Y: z", "", "traceback")),
        pickle.dumps((False, pickle.dumps(42), "x.Y: z", "", "traceback")),
        encode_outcome(True, 42)[:-3],
    ],
)
def test_decode_outcome_never_raises(blob: bytes) -> None:
    ok, exc = decode_outcome(blob)
    assert not ok
    assert isinstance(exc, TypeError)
    assert "could not be unpickled" in str(exc)
