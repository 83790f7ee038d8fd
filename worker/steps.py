"""Named steps of the jobs: the boundaries at which a job may be interrupted, and a hook on them.

A job (a deploy, an archive, a catalog edit) is a sequence of **steps**: database transactions
and S3 calls. Every guarantee of docs/guarantees.md is stated about what holds whatever happens
between two steps: another job's steps, a crash (the job stops here and is redelivered), a
request that never gets its answer. Each transaction names its step
(``unit_of_work("deploy.freeze")``), and S3 calls are steps of their own (``s3.put``,
``s3.head``...), named by whoever wraps the store.

:func:`reached` calls the installed hook, if any, just before a step starts. In production no
hook is installed and it costs one global read. The interleaving explorer of the test suite
(``tests/explorer``) installs one that parks the calling thread at every step and lets a
scheduler decide which job moves next, or makes the job crash there, so every order of the
steps of two or three jobs can be run against the real database and S3 and checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

StepHook = Callable[[str], None]

_hook: StepHook | None = None


def reached(name: str) -> None:
    """The calling job is about to run step ``name`` (a hook may park it, or raise)."""
    hook = _hook
    if hook is not None:
        hook(name)


@contextmanager
def hooked(hook: StepHook) -> Iterator[None]:
    """Install ``hook`` for the duration of the block (tests only)."""
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous
