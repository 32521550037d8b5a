"""One stop rule for a whole search: SIGINT and SIGTERM, on every engine, in every phase.

The first signal stops the run: at once where stopping loses nothing, or (inside a
`deferred` block, such as Optuna's tell step) as soon as the block ends. A second signal
stops at once wherever the run is. Ray Tune's own SIGINT handler is switched off for
vitrank's Tune runs (`TUNE_ENVIRONMENT`) and Ray's SIGTERM handler, which `ray.init`
installs, is replaced again afterwards (`reinstall`): vitrank's handlers decide.

What the caller sees is `Stopped`, a KeyboardInterrupt that knows its signal: the CLI
exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Set for every Tune run vitrank starts: Tune would otherwise catch SIGINT itself, end its
# run "gracefully" and return as if it had finished.
TUNE_ENVIRONMENT = {
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # Tune's per-trial loggers cost more than a trial
    "RAY_AIR_NEW_OUTPUT": "0",
}


class Stopped(KeyboardInterrupt):
    """The run was asked to stop by `signum` (SIGINT or SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Rule:
    """The handler and its state; one per process, active while `stop_rule()` runs."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring: list[Callable[[], None] | None] = []

    def __call__(self, signum: int, frame: Any) -> None:
        if self.received is not None or not self.deferring:
            self.received = self.received or signum
            raise Stopped(signum)  # a second signal, or nothing holds the first
        self.received = signum
        wind_down = self.deferring[-1]
        if wind_down is not None:
            wind_down()  # e.g. ask Optuna for no trial after this one

    def install(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, self)


_ACTIVE: _Rule | None = None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_rule() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Stopped` inside the block (main thread; nested: a no-op)."""
    global _ACTIVE
    if _ACTIVE is not None or not _main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _ACTIVE = _Rule()
    _ACTIVE.install()
    try:
        yield
    finally:
        _ACTIVE = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def reinstall() -> None:
    """Take the signals back after a library (``ray.init``) installed its own handlers."""
    if _ACTIVE is not None and _main_thread():
        _ACTIVE.install()


@contextlib.contextmanager
def deferred(on_signal: Callable[[], None] | None = None) -> Iterator[None]:
    """A first signal inside the block is held until it ends (`on_signal` is called when
    it arrives), then raised; a second one is raised at once."""
    rule = _ACTIVE
    if rule is None:
        yield
        return
    rule.deferring.append(on_signal)
    try:
        yield
    finally:
        rule.deferring.pop()
    if rule.received is not None and not rule.deferring:
        raise Stopped(rule.received)


@contextlib.contextmanager
def immediate() -> Iterator[None]:
    """Inside a `deferred` block: a signal raises at once (work that a stop can cut cleanly,
    such as one trial's objective)."""
    rule = _ACTIVE
    if rule is None:
        yield
        return
    if rule.received is not None:
        raise Stopped(rule.received)  # arrived while the work was being set up
    saved, rule.deferring = rule.deferring, []
    try:
        yield
    finally:
        rule.deferring = saved


def stopped(error: BaseException) -> BaseException:
    """`error` as the `Stopped` of the signal that caused it. Ray's core worker turns any
    KeyboardInterrupt raised while it waits into a plain one, and a library may turn the
    interruption into an error of its own (sqlite's commit, under Optuna's storage, into an
    OperationalError); the rule still knows which signal arrived. Without one, `error` as
    it is."""
    if isinstance(error, Stopped) or _ACTIVE is None or _ACTIVE.received is None:
        return error
    return Stopped(_ACTIVE.received)
