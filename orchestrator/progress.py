"""Progress of the long steps of a run (prepare, train, export, evaluate), reported by the library and
drawn by whoever listens (the CLI draws one progress bar per step: orchestrator.cli.output).

    with progress.step("pretrain: train", total=120, unit="step") as bar:
        bar.update(done=40, loss=2.1)

With no listener installed (the library used from Python, the tests) nothing is drawn; the start
and end of each step are logged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Optional, Protocol

log = logging.getLogger(__name__)


class Listener(Protocol):
    """Draws steps: `begin` once, `update` any number of times, `end` once (ok=False when it failed)."""

    def begin(self, step: "Step") -> None: ...

    def update(self, step: "Step") -> None: ...

    def end(self, step: "Step", ok: bool) -> None: ...


class Step:
    """One long step: its name, how far it is (`done` of `total` `unit`s) and the latest figures."""

    def __init__(self, name: str, total: Optional[int], unit: str, listener: Optional[Listener]):
        self.name, self.total, self.unit = name, total, unit
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._listener = listener

    def update(self, done: Optional[int] = None, total: Optional[int] = None, **fields: Any) -> None:
        """New progress (`done` so far, absolute) and/or figures (loss=…, eval_loss=…) to show."""
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        self.fields.update(fields)
        if self._listener is not None:
            self._listener.update(self)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


_listener: Optional[Listener] = None


def install(listener: Optional[Listener]) -> Optional[Listener]:
    """Make `listener` draw every step of this process; returns the one it replaces."""
    global _listener
    previous, _listener = _listener, listener
    return previous


@contextlib.contextmanager
def step(name: str, total: Optional[int] = None, unit: str = "it") -> Iterator[Step]:
    """A long step; the listener draws it while the block runs."""
    current = Step(name, total, unit, _listener)
    log.info("%s ...", name)
    if _listener is not None:
        _listener.begin(current)
    ok = False
    try:
        yield current
        ok = True
    finally:
        if _listener is not None:
            _listener.end(current, ok)
        log.info("%s %s in %.1f s %s", name, "done" if ok else "failed", current.seconds, current.fields or "")
