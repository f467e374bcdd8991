"""Calls and their outcomes as bytes, to send to a worker process and back.

Plain pickle is the fast path: module-level functions go by reference. Lambdas, closures
and local functions, which it refuses, and whatever ``__main__`` defines go by value,
with cloudpickle: a child started by 'spawn' or 'forkserver' from ``python -c`` or a
REPL has no ``__main__`` to look them up in.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from typing import Any

from ._exceptions import safe_repr

_PROTOCOL = pickle.HIGHEST_PROTOCOL

# A pickle that refers to a global of __main__ holds this module name in full (later
# references to it are memo look-ups): one search of the bytes finds a function or a
# class of __main__ anywhere in a call, for a fraction of a microsecond. Data that only
# happens to hold these bytes is sent by value too: slower, never wrong.
_MAIN = b"__main__"


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process, as text.

    The parent sets it as the ``__cause__`` of that exception, so that a printed
    traceback shows where in the worker the task failed.
    """

    def __str__(self) -> str:
        return f"the traceback in the worker process:\n\n{self.args[0]}"


def _dumps_by_value(obj: object) -> bytes:
    # Imported here, not with the module: its import takes tens of milliseconds, and
    # only what plain pickle can't send needs it.
    import cloudpickle  # type: ignore[import-untyped]

    blob: bytes = cloudpickle.dumps(obj, _PROTOCOL)  # pyright: ignore[reportUnknownMemberType]
    return blob


def _a(obj: object) -> str:
    """``'a <type> object'`` (or ``'an ...'``), to name what could not be pickled."""
    name = _type_name(obj)
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name} object"


def _type_name(obj: object) -> str:
    cls = type(obj)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _text(error: BaseException) -> str:
    """``str(error)`` for a message: never empty, and never failing."""
    try:
        return str(error) or type(error).__qualname__
    except Exception:
        return f"<{type(error).__qualname__}, whose str() failed>"


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a call, to send it to a worker process.

    :raises TypeError: if part of the call cannot be pickled; the message names that part
        (``the callable``, ``args[i]`` or ``kwargs['name']``) and the pickling error,
        which is chained as the ``__cause__``
    """
    call = (fn, args, kwargs)
    try:
        blob = pickle.dumps(call, _PROTOCOL)
    except Exception:
        pass  # a lambda, closure or local function, say: by value below
    else:
        if _MAIN not in blob:
            return blob
        try:
            return _dumps_by_value(call)
        except Exception:
            # Something of __main__ that can't go by value, such as a function that
            # uses a global lock: by reference, it still reaches a child that imports
            # the main script, as multiprocessing's 'spawn' and 'forkserver' do.
            return blob
    try:
        return _dumps_by_value(call)
    except Exception as error:
        what, cause = _culprit(fn, args, kwargs, error)
    raise TypeError(
        f"cannot send {what} cannot be pickled ({_text(cause)}); pass data that can be "
        "pickled, or create the object inside the task"
    ) from cause


def _culprit(
    fn: object, args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
) -> tuple[str, Exception]:
    """Name the part of a call that cannot be pickled alone, and give its error."""
    parts: list[tuple[str, object]] = [("the callable", fn)]
    parts += ((f"args[{i}]", arg) for i, arg in enumerate(args))
    parts += ((f"kwargs[{safe_repr(key)}]", value) for key, value in kwargs.items())
    for label, part in parts:
        try:
            _dumps_by_value(part)
        except Exception as part_error:
            return f"{label} to a worker process: {_a(part)}", part_error
    # Each part pickles alone, but not all of them together.
    return "the call to a worker process: it", error


def decode_call(blob: bytes) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Unpickle a call made by :func:`encode_call`, in the worker process.

    :raises TypeError: if it cannot be unpickled here (a module that this process
        cannot import, say); the unpickling error is chained as the ``__cause__``
    """
    try:
        fn, args, kwargs = pickle.loads(blob)
    except Exception as error:
        raise TypeError(
            f"the worker process could not unpickle the call: "
            f"{type(error).__qualname__}: {_text(error)}"
        ) from error
    return fn, args, kwargs


def run_encoded(blob: bytes) -> Any:
    """Make the call that :func:`encode_call` pickled: what a worker process runs.

    :raises TypeError: if the call cannot be unpickled here (see :func:`decode_call`)
    """
    fn, args, kwargs = decode_call(blob)
    return fn(*args, **kwargs)


def encode_outcome(ok: bool, value: object) -> bytes:
    """Pickle a task's result (``ok``) or exception, to send it back to the parent.

    Never raises: a result that cannot be pickled becomes a ``TypeError`` that says so.
    An exception goes with its traceback as text, and with its type's name and its
    text, for the parent to report an exception that it cannot unpickle.
    """
    if ok:
        try:
            return pickle.dumps((True, value), _PROTOCOL)
        except Exception:
            pass
        try:
            # A lambda, or an instance of a class of __main__ that came by value.
            return _dumps_by_value((True, value))
        except Exception as error:
            # Not chained: the pickler's frames in the remote traceback would only hide
            # this message.
            value = TypeError(
                f"the task's result, {_a(value)}, cannot be pickled to return it from "
                f"the worker process: {_text(error)}; return data that can be pickled"
            )
    if not isinstance(value, BaseException):
        value = TypeError(f"the task's outcome is not an exception: {safe_repr(value)}")
    try:
        remote_traceback = "".join(traceback.format_exception(value))
    except Exception:
        remote_traceback = "<the traceback could not be formatted>"
    blob: bytes | None = None
    reason = ""
    try:
        blob = pickle.dumps(value, _PROTOCOL)
    except Exception:
        try:
            blob = _dumps_by_value(value)  # a class of __main__, or a local one
        except Exception as error:
            reason = _text(error)
    header = f"{_type_name(value)}: {_text(value)}"
    return pickle.dumps((False, blob, header, reason, remote_traceback), _PROTOCOL)


def decode_outcome(blob: bytes) -> tuple[bool, object]:
    """Unpickle an outcome made by :func:`encode_outcome`: ``(ok, result or exception)``.

    Never raises: what cannot be unpickled becomes a ``TypeError`` outcome that says so.
    An exception's ``__cause__`` shows its traceback in the worker process.
    """
    try:
        match pickle.loads(blob):
            case (True, result):
                return True, result
            case (False, bytes() | None as exc_blob, str(header), str(reason), str(text)):
                pass
            case other:
                raise ValueError(f"not an outcome: {safe_repr(other)}")
    except Exception as error:
        decode_error = TypeError(
            f"the outcome from the worker process could not be unpickled: "
            f"{type(error).__qualname__}: {_text(error)}"
        )
        decode_error.__cause__ = error
        return False, decode_error
    exc: BaseException
    if exc_blob is None:
        exc = TypeError(
            f"the task raised an exception that cannot be pickled to return it from the "
            f"worker process: {header} ({reason}); keep only data that can be pickled in "
            "the exception"
        )
    else:
        try:
            exc = pickle.loads(exc_blob)
            if not isinstance(exc, BaseException):
                raise TypeError(f"{_a(exc)} is not an exception")
        except Exception as error:
            # The classic: an __init__ whose arguments differ from the args it passes
            # to super().__init__(), which unpickling calls it with.
            exc = TypeError(
                f"the task raised an exception that could not be unpickled in the parent "
                f"process: {header} ({type(error).__qualname__}: {_text(error)}); give its "
                "class an __init__ that accepts its args, or a __reduce__"
            )
    exc.__cause__ = _RemoteTraceback(text)
    return False, exc
