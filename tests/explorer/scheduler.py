"""A deterministic scheduler for jobs made of named steps, and the enumeration of its schedules.

Each **actor** (a deploy job, an archive job, an edit through the API, a request held up in the
network) runs in a thread of its own. At every step boundary (:func:`worker.steps.reached`, and
the explorer's S3 wrapper) the actor parks and the scheduler decides what happens next: which
parked actor runs its next step, or whether an actor dies there (:class:`Crash`, its job then
redelivered from the start as a new actor), or, at an S3 write, whether the request is held up
(it lands later, as an actor of its own, while the caller gets a timeout) or lands with its
answer lost. Only one actor runs at a time, and no actor parks inside a transaction, so the
database never makes one wait for another: a step is atomic, and the order of steps is exactly
the schedule.

:class:`Explorer` enumerates schedules depth first by replay (stateless model checking, as
CHESS does): run once taking the first choice everywhere, then re-run with the deepest choice
that has an untried alternative switched to it, until every sequence of choices was run. The
choices of a replayed prefix are checked to be the same as when first seen, so a scenario that
is not deterministic fails loudly instead of being half-explored.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from worker import steps

PARK_TIMEOUT = 30.0  # no step takes this long on loopback: a hang is a bug, reported as such


class Crash(BaseException):
    """The actor's process died at this step boundary (a BaseException: nothing catches it)."""


GO = "go"
CRASH = "crash"
HOLD = "hold"  # an S3 write held up in the network: it lands later; the caller times out
LOSE_ANSWER = "lose-answer"  # an S3 write lands; its answer never comes back


@dataclass(frozen=True)
class Choice:
    actor: str
    action: str
    step: str

    def __str__(self) -> str:
        return f"{self.actor}:{self.step}" + ("" if self.action == GO else f"[{self.action}]")


@dataclass
class Faults:
    """What may go wrong in a scenario, at most once per schedule each."""

    crash: frozenset[str] = frozenset()  # actors (by name prefix) that may crash at any boundary
    hold: frozenset[str] = frozenset()  # actors whose S3 writes may be held up
    lose_answer: frozenset[str] = frozenset()  # actors whose S3 writes may lose their answer


@dataclass
class _Actor:
    name: str
    program: Callable[[], None]
    redeliver: Callable[[], None] | None
    thread: threading.Thread | None = None
    parked_at: str | None = None
    action: str = GO
    done: bool = False
    crashed: bool = False
    error: BaseException | None = None
    wake: threading.Event = field(default_factory=threading.Event)


def _matches(name: str, names: frozenset[str]) -> bool:
    return any(name == n or name.startswith(n + "#") for n in names)


class Run:
    """One schedule: actors, the choices made so far, the faults already spent."""

    def __init__(self, decide: Callable[[list[Choice]], int], faults: Faults) -> None:
        self._decide = decide
        self.faults = faults
        self.actors: dict[str, _Actor] = {}
        self._by_thread: dict[int, _Actor] = {}
        self._changed = threading.Condition()
        self.trace: list[Choice] = []
        self.crashes = 0
        self.network_faults = 0
        self.held = 0

    # -- actors ----------------------------------------------------------------------------

    def spawn(
        self, name: str, program: Callable[[], None], redeliver: Callable[[], None] | None = None
    ) -> None:
        """Start an actor; it runs until its first step boundary before anything else moves."""
        while name in self.actors:
            name += "'"
        actor = _Actor(name, program, redeliver)
        self.actors[name] = actor
        thread = threading.Thread(target=self._body, args=(actor,), name=f"actor-{name}")
        actor.thread = thread
        thread.start()
        self._wait_settled(actor)

    def _body(self, actor: _Actor) -> None:
        self._by_thread[threading.get_ident()] = actor
        try:
            actor.program()
        except Crash:
            actor.crashed = True
        except BaseException as exc:  # reported by the explorer with the schedule
            actor.error = exc
        finally:
            with self._changed:
                actor.done = True
                actor.parked_at = None
                self._changed.notify_all()

    def current(self) -> _Actor | None:
        return self._by_thread.get(threading.get_ident())

    def checkpoint(self, step: str) -> str:
        """Called by an actor before ``step``: park until scheduled; returns the action."""
        actor = self.current()
        if actor is None:
            return GO  # setup and checks run outside the schedule
        with self._changed:
            actor.parked_at = step
            actor.wake.clear()
            self._changed.notify_all()
        if not actor.wake.wait(PARK_TIMEOUT):
            raise RuntimeError(f"actor {actor.name} never resumed at {step}")
        if actor.action == CRASH:
            raise Crash(step)
        return actor.action

    def _wait_settled(self, actor: _Actor) -> None:
        with self._changed:
            ok = self._changed.wait_for(
                lambda: actor.done or actor.parked_at is not None, PARK_TIMEOUT
            )
        if not ok:
            raise RuntimeError(f"actor {actor.name} neither parked nor finished")

    # -- the schedule ----------------------------------------------------------------------

    def _choices(self) -> list[Choice]:
        out: list[Choice] = []
        for actor in self.actors.values():
            step = actor.parked_at
            if actor.done or step is None:
                continue
            out.append(Choice(actor.name, GO, step))
            budget_left = self.crashes + self.network_faults == 0
            if not budget_left:
                continue
            if _matches(actor.name, self.faults.crash):
                out.append(Choice(actor.name, CRASH, step))
            if step == "s3.put" and _matches(actor.name, self.faults.hold):
                out.append(Choice(actor.name, HOLD, step))
            if step == "s3.put" and _matches(actor.name, self.faults.lose_answer):
                out.append(Choice(actor.name, LOSE_ANSWER, step))
        return out

    def run_to_end(self, max_steps: int = 400) -> None:
        for _ in range(max_steps):
            choices = self._choices()
            if not choices:
                return
            choice = choices[self._decide(choices)]
            self.trace.append(choice)
            actor = self.actors[choice.actor]
            if choice.action == CRASH:
                self.crashes += 1
            elif choice.action in (HOLD, LOSE_ANSWER):
                self.network_faults += 1
                self.held += choice.action == HOLD
            actor.action = choice.action
            with self._changed:
                actor.parked_at = None
            actor.wake.set()
            self._wait_settled(actor)
            if actor.crashed and actor.redeliver is not None:
                base = actor.name.split("#")[0]
                self.spawn(f"{base}#redelivered", actor.redeliver)
        raise RuntimeError(f"schedule longer than {max_steps} steps: {self.trace_text()}")

    def trace_text(self) -> str:
        return " → ".join(str(c) for c in self.trace)

    def errors(self) -> list[tuple[str, BaseException]]:
        return [(a.name, a.error) for a in self.actors.values() if a.error is not None]

    def join(self) -> None:
        for actor in self.actors.values():
            if actor.thread is not None:
                actor.thread.join(PARK_TIMEOUT)


# Steps that only read: two reads commute, so their order is not explored twice.
READ_STEPS = frozenset(
    {
        "publish.read_state",
        "publish.check_fence",
        "publish.read_record",
        "deploy.read_for_failure",
        "late_writes.read_archives",
        "late_writes.read_failures",
        "s3.head",
        "s3.list",
    }
)


def independent(a: Choice, b: Choice) -> bool:
    """Do steps ``a`` and ``b`` (of two actors) commute? A database step and an S3 call touch
    different stores; two reads of one store commute. Anything else, and every fault, is
    assumed not to (only ever more schedules than needed, never fewer)."""
    if a.actor == b.actor or a.action != GO or b.action != GO:
        return False
    a_s3, b_s3 = a.step.startswith("s3."), b.step.startswith("s3.")
    if a_s3 != b_s3:
        return True
    return a.step in READ_STEPS and b.step in READ_STEPS


class Explorer:
    """Depth-first enumeration of every schedule (by replay), or seeded random ones.

    **Sleep sets** (Godefroid's partial-order reduction) keep it to one schedule per order of
    the *dependent* steps: after the subtree where actor X moved first was explored, the subtree
    where Y moves first does not try X next while only steps independent of X's have run (the
    result would equal one already checked). Which steps are independent is
    :func:`independent`; faults never are. ``pruned`` counts the branches this skipped.
    """

    def __init__(self) -> None:
        self.schedules = 0
        self.pruned = 0

    def exhaustive(
        self, limit: int, preemptions: int | None = None
    ) -> Iterator[Callable[[list[Choice]], int]]:
        """Deciders, one per schedule, until every sequence of dependent choices was taken.

        ``preemptions``: when set, only schedules that switch away from an actor that could have
        gone on at most this many times (CHESS's preemption bound: most concurrency bugs need
        very few); None explores them all."""
        seen: list[list[Choice]] = []  # the choices offered at each depth of the current path
        sleeps: list[frozenset[Choice]] = []  # the sleep set on arriving at each depth
        taken: list[int] = []
        while True:
            if self.schedules >= limit:
                raise RuntimeError(f"more than {limit} schedules: make the scenario smaller")
            replay = list(taken)
            depth = 0
            sleep: frozenset[Choice] = frozenset()
            last: str | None = None
            switches = 0

            def decide(offered: list[Choice], replay: list[int] = replay) -> int:
                nonlocal depth, sleep, last, switches
                choices = offered
                bounded = preemptions is not None and switches >= preemptions
                if bounded and any(c.actor == last for c in offered):
                    choices = [c for c in offered if c.actor == last]
                if depth < len(replay):
                    if choices != seen[depth]:
                        raise RuntimeError(
                            f"scenario is not deterministic at depth {depth}: "
                            f"{[str(c) for c in seen[depth]]} then {[str(c) for c in choices]}"
                        )
                    index = replay[depth]
                else:
                    awake = [i for i, c in enumerate(choices) if c not in sleep]
                    self.pruned += len(choices) - len(awake)
                    seen.append(choices)
                    # Every choice asleep: this path only repeats checked orders; finish it
                    # without branching (all marked asleep).
                    sleeps.append(sleep if awake else frozenset(choices))
                    index = awake[0] if awake else 0
                    taken.append(index)
                at_node = sleeps[depth]
                done_here = [c for c in choices[:index] if c not in at_node]
                chosen = choices[index]
                if preemptions is None:  # sleep sets and a bound together could skip schedules
                    sleep = frozenset(
                        c for c in (at_node | set(done_here)) if independent(c, chosen)
                    )
                if (
                    last is not None
                    and chosen.actor != last
                    and any(c.actor == last for c in offered)
                ):
                    switches += 1
                last = chosen.actor
                depth += 1
                return offered.index(chosen)

            self.schedules += 1
            yield decide
            del seen[depth:], sleeps[depth:], taken[depth:]
            while taken:
                d = len(taken) - 1
                later = [
                    j for j in range(taken[d] + 1, len(seen[d])) if seen[d][j] not in sleeps[d]
                ]
                if later:
                    taken[d] = later[0]
                    break
                taken.pop(), seen.pop(), sleeps.pop()
            if not taken:
                return

    def randomly(self, seed: int, count: int) -> Iterator[Callable[[list[Choice]], int]]:
        rng = random.Random(seed)
        for _ in range(count):
            self.schedules += 1
            yield lambda choices: rng.randrange(len(choices))


def install(run: Run) -> Callable[[str], None]:
    """The :mod:`worker.steps` hook for ``run``: database steps park; no fault but a crash."""

    def hook(name: str) -> None:
        action = run.checkpoint(name)
        assert action == GO, f"{action} offered at the database step {name}"

    return hook


def hooked(run: Run) -> Iterator[None]:
    return steps.hooked(install(run))  # type: ignore[return-value]
