"""SIGTERM / SIGINT as a flag the training loop polls, agreed on by every process.

A preempted job (SLURM, a cloud scheduler) gets SIGTERM some seconds before it is killed; Ctrl-C sends
SIGINT. The training loop saves a checkpoint at the next step boundary and exits cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _jax_preemption_service_active() -> bool:
    """True when jax.distributed runs its preemption sync service (it owns SIGTERM then)."""
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


class PreemptionFlag:
    """Turns SIGTERM / SIGINT into a flag the training loop polls to save and exit cleanly.

    The handler only sets a flag; the loop calls ``should_stop(step)`` once per step and, when
    it returns True, saves a checkpoint and leaves the loop. A second SIGINT
    while the flag is already set raises ``KeyboardInterrupt`` (Ctrl-C twice = stop now).

    Multi-host: every process must stop at the same step, or the next collective hangs.
    ``should_stop`` is then a collective decision: JAX's preemption sync point (JAX's
    distributed service handles SIGTERM itself, so this class leaves SIGTERM to it) OR any
    process's local flag, gathered every ``sync_every`` steps. Call it on every process at
    every step.
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        *,
        sync_every: int = 10,
    ):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}.")
        self._signals = tuple(signals)
        self._sync_every = sync_every
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.signal_name: str | None = None

    def install(self) -> PreemptionFlag:
        """Installs the handlers (main thread only); keeps the previous ones for ``uninstall``."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionFlag.install() must be called from the main thread.")
        for sig in self._signals:
            if sig == signal.SIGTERM and _jax_preemption_service_active():
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were active before ``install``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        log.warning(
            "Received %s: will save a checkpoint and stop at the next step boundary.", self.signal_name
        )

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and stop after ``step``; same answer on every process."""
        if jax.process_count() == 1:
            return self._event.is_set()
        stop = False
        if _jax_preemption_service_active():
            with contextlib.suppress(RuntimeError):
                stop = multihost_utils.reached_preemption_sync_point(int(step))
        if int(step) % self._sync_every == 0:
            flags = multihost_utils.process_allgather(np.asarray(self._event.is_set(), np.int32))
            stop = stop or bool(np.any(flags))
        return stop
