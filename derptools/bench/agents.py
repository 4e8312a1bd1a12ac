"""The parent's side of the agent processes: start them, send commands, gather results and progress."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from .agent import agent_main


class AgentError(RuntimeError):
    pass


class Agents:
    """P load-generator processes. Use as a context manager; they exit when it closes."""

    def __init__(self, count: int, url: str, *, fast_start: bool = False) -> None:
        # spawn, not fork: the parent may run rich's refresh thread, and a forked child must not
        # inherit a half-held lock from it.
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(count):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=agent_main, args=(child_end, url, fast_start), daemon=True)
            proc.start()
            child_end.close()
            self.pipes.append(parent_end)
            self.procs.append(proc)
        self.progress = [0] * count

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __len__(self) -> int:
        return len(self.procs)

    def __enter__(self) -> Agents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("exit", {}))
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()

    def send(self, index: int, name: str, **kwargs: Any) -> None:
        self.progress[index] = 0
        self.pipes[index].send((name, kwargs))

    def call(self, index: int, name: str, **kwargs: Any) -> Any:
        self.send(index, name, **kwargs)
        return self.gather([index])[0]

    def call_all(self, name: str, per_agent: list[dict[str, Any]] | None = None,
                 on_progress: Callable[[int], None] | None = None,
                 until: list[tuple[float, Callable[[], None]]] | None = None) -> list[Any]:
        """Send one command to every agent (per_agent[i] are agent i's kwargs) and wait for all results.

        `until` are (monotonic deadline, action) pairs run, in order, when their time comes while
        waiting: this is how the parent samples server CPU exactly at the measurement window's ends.
        """
        for index in range(len(self)):
            self.send(index, name, **(per_agent[index] if per_agent else {}))
        return self.gather(list(range(len(self))), on_progress, until)

    def gather(self, indexes: list[int], on_progress: Callable[[int], None] | None = None,
               until: list[tuple[float, Callable[[], None]]] | None = None) -> list[Any]:
        results: dict[int, Any] = {}
        pending = {self.pipes[i]: i for i in indexes}
        timers = sorted(until or [], key=lambda item: item[0])
        while pending:
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                timers.pop(0)[1]()
            timeout = max(0.0, timers[0][0] - now) if timers else 1.0
            for ready in wait(list(pending), timeout):
                pipe = cast(Connection, ready)  # wait() returns what it was given: our pipes
                index = pending[pipe]
                try:
                    kind, value = pipe.recv()
                except EOFError as exc:
                    raise AgentError(f"load-generator process {index} died") from exc
                if kind == "progress":
                    self.progress[index] = value
                    if on_progress is not None:
                        on_progress(sum(self.progress))
                elif kind == "error":
                    raise AgentError(f"load-generator process {index} failed:\n{value}")
                else:
                    results[index] = value
                    del pending[pipe]  # type: ignore[arg-type]
            for index in list(pending.values()):
                if not self.procs[index].is_alive():
                    raise AgentError(f"load-generator process {index} exited ({self.procs[index].exitcode})")
        for deadline, action in timers:  # a window that outlived the agents still gets its samples
            time.sleep(max(0.0, deadline - time.monotonic()))
            action()
        return [results[i] for i in indexes]
