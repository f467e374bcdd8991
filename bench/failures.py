"""``python -m bench.failures``: what happens when things go wrong, per process pool.

For ``ProcessPoolExecutor``, aiomultiprocess and PortalPool's process host (asyncio and
trio, once it exists), each with 2 workers:

1. ``sigkill``: one child is SIGKILLed with 8 tasks in flight. How many futures fail, how
   long after the kill, and does the pool still run new work?
2. ``sigint``: Ctrl-C (SIGINT to the whole process group) while 4 tasks run. Does the
   parent exit, how fast, and did the tasks' ``finally`` blocks run?
3. ``unpicklable``: a ``threading.Lock()`` argument. Does ``submit`` raise at once, does
   the future fail, or does it hang?
4. ``cancel``: ``cancel()`` of a running future. What does it return, and does the task
   stop early?

Every cell is one run of ``python -m bench.failures --cell SITUATION KEY DIRECTORY`` in a
new session, under a hard timeout; afterwards its whole process group is killed, so no
child outlives its cell. The tasks leave marker files in DIRECTORY
(:mod:`bench.process_workloads`). This module is the cell's ``__main__``, and so its
children's too: it imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .processes import ProcessContender

#: a cell still running after this long is recorded as hung, and killed
HARD_TIMEOUT = 15.0
WORKERS = 2
KILL_TASKS = 8
KILL_SLEEP = 1.0
#: how long after the kill the futures get to settle
KILL_SETTLE = 6.0
NEW_WORK_TIMEOUT = 3.0
INTERRUPT_TASKS = 4
#: long enough that a parent which waits for its tasks is told apart from one that doesn't
INTERRUPT_SLEEP = 5.0
#: how long the parent gets to exit after the Ctrl-C
INTERRUPT_EXIT = 8.0
#: how long after the parent exits its children get to run their ``finally`` blocks
INTERRUPT_GRACE = 0.5
UNPICKLABLE_WAIT = 5.0
#: characters of the unpicklable cell's error message shown in the table
UNPICKLABLE_SHOWN = 80
CANCEL_SLEEP = 2.0
READY_TIMEOUT = 8.0

SITUATIONS: dict[str, str] = {
    "sigkill": f"one child SIGKILLed with {KILL_TASKS} tasks in flight ({KILL_SLEEP:g} s sleeps)",
    "sigint": f"Ctrl-C to the process group while {INTERRUPT_TASKS} tasks run "
    f"({INTERRUPT_SLEEP:g} s sleeps)",
    "unpicklable": "an unpicklable argument (`threading.Lock()`)",
    "cancel": f"`cancel()` of a running future ({CANCEL_SLEEP:g} s sleep)",
}
#: the contenders probed, keys of bench.processes.PROCESS_CONTENDERS
CONTENDER_KEYS = ("executor", "amp", "process_asyncio", "process_trio")


# -- inside a cell -----------------------------------------------------------------------


def _names(directory: str, prefix: str) -> list[str]:
    return sorted(path.name for path in Path(directory).iterdir() if path.name.startswith(prefix))


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _capacity(entrant: ProcessContender, tasks: int) -> int:
    """How many of ``tasks`` run at once: all of them on a pool that runs coroutines, one
    per worker on ``ProcessPoolExecutor``."""
    return tasks if entrant.runs_coroutines else min(tasks, WORKERS)


def _error(exc: BaseException, limit: int = 60) -> str:
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _new_work(entrant: ProcessContender, submit: Callable[..., Future[Any]]) -> str:
    """Does ``submit`` (the pool's, or one PortalPool worker's) still take and run a
    no-op?"""
    from concurrent.futures import TimeoutError as FutureTimeout

    start = time.perf_counter()
    try:
        future = submit(entrant.noop)
    except Exception as exc:
        return f"submit raises {_error(exc)}"
    try:
        future.result(timeout=NEW_WORK_TIMEOUT)
    except FutureTimeout:
        return f"no result in {NEW_WORK_TIMEOUT:g} s"
    except Exception as exc:
        return f"fails with {_error(exc)}"
    return f"runs ({time.perf_counter() - start:.2f} s)"


def cell_sigkill(entrant: ProcessContender, directory: str) -> dict[str, Any]:
    """SIGKILL the child running the most tasks; watch the futures and the pool."""
    from concurrent.futures import wait

    pool = entrant.open(WORKERS)
    pool.run(entrant.noop)
    settled_at: dict[int, float] = {}
    futures = []
    for index in range(KILL_TASKS):
        future = pool.submit(entrant.marked_sleep, directory, f"t{index}", KILL_SLEEP)
        future.add_done_callback(
            lambda _, index=index: settled_at.setdefault(index, time.perf_counter())
        )
        futures.append(future)
    capacity = _capacity(entrant, KILL_TASKS)
    if not _wait_for(lambda: len(_names(directory, "start-")) >= capacity, READY_TIMEOUT):
        raise RuntimeError(f"only {len(_names(directory, 'start-'))} tasks started")
    time.sleep(0.1)
    running: dict[int, int] = {}
    for name in _names(directory, "start-"):
        pid = int(name.rsplit("-", 1)[1])
        running[pid] = running.get(pid, 0) + 1
    victim = max(sorted(running), key=lambda pid: running[pid])
    if victim == os.getpid():
        alone = {"text": "does not apply: the tasks run in this process"}
        _emit(alone)
        pool.shutdown()
        return alone
    # The tasks the killed child was running, by index (``start-t<index>-<pid>``).
    in_victim = sorted(
        int(name.split("-")[1][1:])
        for name in _names(directory, "start-")
        if name.endswith(f"-{victim}")
    )
    from .processes import PortalPoolBench

    # On PortalPool, the new work goes to the killed child's worker: to its new child.
    portal_pool = pool.pool if isinstance(pool, PortalPoolBench) else None
    worker = None
    if portal_pool is not None:
        worker = next(w for w in portal_pool.workers if w.pid == victim)
    killed_at = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    wait(futures, timeout=KILL_SETTLE)
    failed = [i for i, f in enumerate(futures) if f.done() and f.exception() is not None]
    succeeded = [i for i, f in enumerate(futures) if f.done() and f.exception() is None]
    errors = sorted({type(futures[i].exception()).__name__ for i in failed})
    messages = sorted({str(futures[i].exception()).strip() for i in failed})
    after = [settled_at[i] - killed_at for i in failed]
    figures: dict[str, Any] = {
        "tasks": KILL_TASKS,
        "running_in_killed_child": running[victim],
        "running_in_all_children": sum(running.values()),
        "failed": len(failed),
        "succeeded": len(succeeded),
        "unsettled": KILL_TASKS - len(failed) - len(succeeded),
        #: the failed futures are exactly those of the tasks the killed child ran
        "failed_are_killed_childs": failed == in_victim,
        "errors": errors,
        "messages": messages,
        "names_sigkill": bool(messages) and all("SIGKILL" in m for m in messages),
        "first_failure_s": min(after) if after else None,
        "last_failure_s": max(after) if after else None,
        "new_work": _new_work(entrant, pool.submit if worker is None else worker.submit),
    }
    if portal_pool is not None and worker is not None:
        figures["new_work_on"] = f"worker {worker.index}"
        with contextlib.suppress(RuntimeError):  # no child running
            figures["replacement_pid"] = worker.pid
        figures["restarts"] = portal_pool.stats().restarts
    parts = [f"killed child ran {running[victim]}: {len(failed)}/{KILL_TASKS} fail"]
    if failed and failed == in_victim and len(failed) < KILL_TASKS:
        parts[0] += " (exactly its tasks)"
    if after:
        named = ", names SIGKILL" if figures["names_sigkill"] else ""
        parts[0] += f" within {max(after):.3f} s ({', '.join(errors)}{named})"
    if succeeded:
        parts.append(f"{len(succeeded)} succeed")
    if figures["unsettled"]:
        parts.append(f"**{figures['unsettled']} never settle** (>{KILL_SETTLE:g} s)")
    where = " on that worker (its new child)" if worker is not None else ""
    parts.append(f"new work{where}: {figures['new_work']}")
    figures["text"] = "; ".join(parts)
    _emit(figures)
    pool.shutdown()
    return figures


def _names_argument(message: str) -> bool:
    """Whether an error message says which argument was at fault: ``args[0]`` (the
    process host's spelling), or the words "argument 0" / "arg 0"."""
    lowered = message.lower()
    return "args[0]" in lowered or any(
        f"{word} 0" in lowered or f"{word} #0" in lowered for word in ("argument", "arg")
    )


def cell_unpicklable(entrant: ProcessContender, directory: str) -> dict[str, Any]:
    """Submit a no-op with a lock as its argument."""
    import threading
    from concurrent.futures import TimeoutError as FutureTimeout

    pool = entrant.open(WORKERS)
    pool.run(entrant.noop)
    start = time.perf_counter()
    figures: dict[str, Any]
    raised: BaseException | None = None
    try:
        future = pool.submit(entrant.noop, threading.Lock())
    except Exception as exc:
        raised = exc
        figures = {"outcome": "submit raises", "message": _error(exc, UNPICKLABLE_SHOWN)}
        figures["text"] = f"`submit` raises at once: {figures['message']}"
    else:
        try:
            future.result(timeout=UNPICKLABLE_WAIT)
        except FutureTimeout:
            figures = {"outcome": "hangs", "message": None}
            figures["text"] = f"**hangs**: no outcome in {UNPICKLABLE_WAIT:g} s"
        except Exception as exc:
            raised = exc
            seconds = time.perf_counter() - start
            message = _error(exc, UNPICKLABLE_SHOWN)
            figures = {"outcome": "future fails", "message": message, "after_s": seconds}
            figures["text"] = f"the future fails after {seconds:.3f} s: {figures['message']}"
        else:
            figures = {"outcome": "runs", "message": None}
            figures["text"] = "runs (the argument was not pickled)"
    figures["names_argument"] = raised is not None and _names_argument(str(raised))
    figures["text"] += " (names the argument)" if figures["names_argument"] else ""
    _emit(figures)
    pool.shutdown()
    return figures


def cell_cancel(entrant: ProcessContender, directory: str) -> dict[str, Any]:
    """Cancel a future whose task is sleeping; see whether the task stops."""
    pool = entrant.open(WORKERS)
    pool.run(entrant.noop)
    future = pool.submit(entrant.marked_sleep, directory, "c", CANCEL_SLEEP)
    if not _wait_for(lambda: bool(_names(directory, "start-c-")), READY_TIMEOUT):
        raise RuntimeError("the task did not start")
    cancelled_at = time.perf_counter()
    returned = future.cancel()
    ended = _wait_for(lambda: bool(_names(directory, "end-c-")), CANCEL_SLEEP + 2)
    after = time.perf_counter() - cancelled_at
    how = _names(directory, "end-c-")[0].rsplit("-", 1)[1] if ended else None
    figures: dict[str, Any] = {
        "cancel_returned": returned,
        "future_cancelled": future.cancelled(),
        "task_end": how,
        "task_end_after_s": after if ended else None,
    }
    if how == "interrupted":
        task = f"the task stops {after:.3f} s later, `finally` ran"
    elif how == "finished":
        task = f"the task runs to its end ({after:.1f} s later)"
    else:
        task = f"no `finally` within {after:.1f} s"
    figures["text"] = f"`cancel()` returns {returned}; {task}"
    _emit(figures)
    pool.shutdown()
    return figures


def cell_sigint(entrant: ProcessContender, directory: str) -> dict[str, Any]:
    """Run 4 tasks the way a user would, in a ``with`` block; the runner sends Ctrl-C once
    the ``ready`` file exists."""
    capacity = _capacity(entrant, INTERRUPT_TASKS)

    def started() -> bool:
        return len(_names(directory, "start-")) >= capacity

    if entrant.kind == "amp":
        import asyncio

        asyncio.run(_amp_sigint(entrant, directory, started))
        return {}
    manager: Any
    if entrant.kind == "executor":
        from concurrent.futures import ProcessPoolExecutor

        from .processes import start_context

        manager = ProcessPoolExecutor(WORKERS, mp_context=start_context())
    else:
        from portal_pool import PortalPool

        manager = PortalPool(WORKERS, backend=entrant.backend, **entrant.host)
    with manager as pool:
        futures = [
            pool.submit(entrant.marked_sleep, directory, f"i{index}", INTERRUPT_SLEEP)
            for index in range(INTERRUPT_TASKS)
        ]
        if _wait_for(started, READY_TIMEOUT):
            Path(directory, "ready").touch()
        for future in futures:
            future.result()
    return {}


async def _amp_sigint(
    entrant: ProcessContender, directory: str, started: Callable[[], bool]
) -> None:
    import asyncio

    import aiomultiprocess

    async with aiomultiprocess.Pool(processes=WORKERS, **entrant.options) as pool:
        tasks = [
            asyncio.ensure_future(
                pool.apply(entrant.marked_sleep, (directory, f"i{index}", INTERRUPT_SLEEP))
            )
            for index in range(INTERRUPT_TASKS)
        ]
        deadline = time.monotonic() + READY_TIMEOUT
        while not started() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if started():
            Path(directory, "ready").touch()
        await asyncio.gather(*tasks)


CELLS: dict[str, Callable[[ProcessContender, str], dict[str, Any]]] = {
    "sigkill": cell_sigkill,
    "sigint": cell_sigint,
    "unpicklable": cell_unpicklable,
    "cancel": cell_cancel,
}


def _emit(figures: dict[str, Any]) -> None:
    """Print the cell's figures before it shuts its pool down, which may hang."""
    print(json.dumps(figures), flush=True)


# -- the runner --------------------------------------------------------------------------


def _group_alive(group: int) -> int:
    """How many live processes (zombies aside) are in this process group."""
    from .processes import process_table

    return sum(1 for info in process_table().values() if info.group == group and info.state != "Z")


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:160] if lines else "no output"


def _interrupt(
    process: subprocess.Popen[bytes], directory: Path, deadline: float
) -> dict[str, Any]:
    """Send Ctrl-C to the cell's group once its tasks run; time the parent's exit."""
    if (
        not _wait_for(
            lambda: (directory / "ready").exists() or process.poll() is not None,
            max(0.0, deadline - time.monotonic() - INTERRUPT_EXIT - 1),
        )
        or not (directory / "ready").exists()
    ):
        raise RuntimeError("the tasks never all started")
    sent = time.perf_counter()
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=INTERRUPT_EXIT)
    except subprocess.TimeoutExpired:
        exited = None
    else:
        exited = time.perf_counter() - sent
    time.sleep(INTERRUPT_GRACE)
    ends = _names(str(directory), "end-")
    interrupted = sum(1 for name in ends if name.endswith("-interrupted"))
    finished = len(ends) - interrupted
    left = _group_alive(process.pid) if exited is not None else None
    figures: dict[str, Any] = {
        "parent_exit_s": exited,
        "returncode": process.returncode,
        "finally_interrupted": interrupted,
        "finally_finished": finished,
        "tasks": INTERRUPT_TASKS,
        "children_left_running": left,
    }
    if exited is None:
        text = f"**parent still running after {INTERRUPT_EXIT:g} s**"
    else:
        text = f"parent exits in {exited:.2f} s"
    text += f"; `finally` ran in {interrupted + finished}/{INTERRUPT_TASKS}"
    if ends:
        text += f" ({interrupted} interrupted, {finished} finished)"
    if left:
        text += f"; **{left} process(es) left running**"
    figures["text"] = text
    return figures


def run_cell(situation: str, key: str, timeout: float = HARD_TIMEOUT) -> dict[str, Any]:
    """One cell in its own session and temporary directory, then its group killed."""
    from .cases import REPO_ROOT, subprocess_env

    with tempfile.TemporaryDirectory(prefix="bench-failures-") as scratch:
        markers = Path(scratch, "markers")
        markers.mkdir()
        stdout, stderr = Path(scratch, "stdout"), Path(scratch, "stderr")
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "bench.failures", "--cell", situation, key, str(markers)],
                stdout=out,
                stderr=err,
                cwd=REPO_ROOT,
                env=subprocess_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        try:
            if situation == "sigint":
                return _interrupt(process, markers, deadline)
            try:
                process.wait(timeout=timeout)
                hung = False
            except subprocess.TimeoutExpired:
                hung = True
            lines = stdout.read_text(errors="replace").splitlines()
            if not lines:
                if hung:
                    return {"hung": True, "text": f"**hung** (>{timeout:g} s)"}
                error = f"exit status {process.returncode}: {_last_line(stderr)}"
                return {"error": error, "text": f"failed ({error})"}
            figures: dict[str, Any] = json.loads(lines[0])
            if hung:
                figures["hung_on_shutdown"] = True
                figures["text"] += f"; then **hangs in shutdown** (>{timeout:g} s in all)"
            return figures
        except Exception as exc:
            return {"error": _error(exc), "text": f"failed: {_error(exc)}"}
        finally:
            _kill_group(process.pid)
            process.wait()


def measure(timeout: float = HARD_TIMEOUT) -> dict[str, dict[str, Any]]:
    """Every cell: ``{contender key: {situation: figures}}``; a contender that cannot run
    here gets ``{"skipped": reason}``."""
    from .processes import contender

    results: dict[str, dict[str, Any]] = {}
    for key in CONTENDER_KEYS:
        entrant = contender(key)
        reason = entrant.unavailable
        if reason is not None:
            results[key] = {"skipped": reason}
            print(f"  failures: skipping {entrant.label}: {reason}", file=sys.stderr, flush=True)
            continue
        results[key] = {}
        for situation in SITUATIONS:
            start = time.perf_counter()
            cell = run_cell(situation, key, timeout)
            results[key][situation] = cell
            print(
                f"  failures  {entrant.label:<28} {situation:<12} {cell['text']} "
                f"[{time.perf_counter() - start:.1f} s]",
                file=sys.stderr,
                flush=True,
            )
    return results


def _run_in_cell(situation: str, key: str, directory: str) -> int:
    from .processes import contender

    CELLS[situation](contender(key), directory)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run every cell and print the table (or, with ``--cell``, run one cell)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.failures",
        description="What happens when a child dies, Ctrl-C arrives, an argument can't be "
        "pickled, or a running future is cancelled, for each process pool.",
    )
    parser.add_argument(
        "--timeout", type=float, default=HARD_TIMEOUT, help="seconds before a cell is hung"
    )
    parser.add_argument(
        "--cell", nargs=3, metavar=("SITUATION", "KEY", "DIRECTORY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.cell:
        # As a terminal starts a program: a bench run started in the background (with
        # '&', nohup, some CI launchers) passes SIGINT on ignored, and the Ctrl-C cell
        # would then measure nothing.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return _run_in_cell(*args.cell)
    from .processes import PROCESS_CONTENDERS
    from .report import render_failures

    results = measure(args.timeout)
    labels = {entrant.key: entrant.label for entrant in PROCESS_CONTENDERS}
    print(render_failures(results, labels, args.timeout))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
