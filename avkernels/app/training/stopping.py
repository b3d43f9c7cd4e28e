"""Stopping a run: on request or on Ctrl-C, after the step in progress, with a checkpoint that
holds everything done so far."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """A stop was requested (Ctrl-C or :meth:`Trainer.request_stop`); the checkpoint holds
    everything done so far: resume with ``Trainer(..., resume=True)`` / ``--resume``."""


@contextlib.contextmanager
def stop_on_sigint(trainer):
    """First Ctrl-C: finish the step, checkpoint, stop. A second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        trainer.request_stop()
        signal.signal(signal.SIGINT, previous)
        if trainer.ranks.is_main:
            print(
                "\navkernels: stopping after this step (Ctrl-C again to abort at once)",
                file=sys.stderr,
            )

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
