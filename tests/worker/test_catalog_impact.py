"""worker.services.catalog_impact: a catalog edit and a snapshot freeze meet at the organization.

Real concurrent transactions on SQLite and PostgreSQL (two threads, two connections): whichever
takes the organization second sees what the first committed. On PostgreSQL the freeze holds the
row ``FOR SHARE`` and the edit ``FOR UPDATE``; on SQLite the database write lock orders them. The
interleaving explorer runs the same two as atomic steps; this test is what makes them atomic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.explorer.world import World
from worker.db import unit_of_work
from worker.models import Purpose, Widget, utcnow
from worker.services.catalog_impact import add_snapshot_refs, mark_embedding_widgets
from worker.services.live_state import take_sequence

WAIT = 10.0  # bound on every wait below; the blocked side is given 0.5 s to show it waits
BLOCKED_FOR = 0.5


class Side(threading.Thread):
    """One transaction in a thread: ``body`` runs inside it; ``hold`` (if given) keeps it open
    after ``body`` until released."""

    def __init__(self, body: Callable[[Any], Any], hold: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.body, self.hold = body, hold
        self.inside = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with unit_of_work() as session:
                self.result = self.body(session)
                self.inside.set()
                if self.hold is not None:
                    assert self.hold.wait(WAIT), "never released"
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.error = exc
            self.inside.set()

    def finish(self) -> Any:
        self.join(WAIT)
        assert not self.is_alive(), "transaction never ended"
        if self.error is not None:
            raise self.error
        return self.result


def _edit(world: World) -> Callable[[Any], int]:
    def body(session: Any) -> int:
        purpose = session.get(Purpose, world.purposes["p"])
        purpose.description = {"en": "p v2"}
        purpose.updated_at = utcnow()
        session.add(purpose)
        return mark_embedding_widgets(session, world.org_id, purpose.id)

    return body


def _freeze(world: World) -> Callable[[Any], str]:
    """What a freeze does with the catalog: its first statement (the widget's sequence, and on
    PostgreSQL the organization's share lock), read the item, write the snapshot's refs."""

    def body(session: Any) -> str:
        assert take_sequence(session, world.org_id, world.widget_id) is not None
        text = str(session.get(Purpose, world.purposes["p"]).description["en"])
        config = {"purposes": [{"id": world.purposes["p"]}]}
        add_snapshot_refs(session, world.org_id, world.widget_id, 1, config)
        return text

    return body


def _version(world: World) -> int:
    with unit_of_work() as session:
        widget = session.get(Widget, world.widget_id)
        assert widget is not None
        return widget.version


def test_an_edit_waits_for_a_freeze_in_flight_then_marks_its_widget(database: str) -> None:
    world = World.create(selected=("p",))
    before = _version(world)
    release = threading.Event()
    freeze = Side(_freeze(world), hold=release)
    freeze.start()
    assert freeze.inside.wait(WAIT)
    edit = Side(_edit(world))
    edit.start()
    edit.join(BLOCKED_FOR)
    assert edit.is_alive(), "the edit did not wait for the freeze in flight"
    release.set()
    assert freeze.finish() == "p v1"  # the freeze took the old text...
    assert edit.finish() == 1  # ...and the edit found the freeze's refs: the widget is marked
    assert _version(world) == before + 1


def test_a_freeze_waits_for_an_edit_in_flight_then_reads_the_new_text(database: str) -> None:
    world = World.create(selected=("p",))
    release = threading.Event()
    edit = Side(_edit(world), hold=release)
    edit.start()
    assert edit.inside.wait(WAIT)
    assert edit.result == 0  # no snapshot embeds it yet
    freeze = Side(_freeze(world))
    freeze.start()
    freeze.join(BLOCKED_FOR)
    assert freeze.is_alive(), "the freeze did not wait for the edit in flight"
    release.set()
    edit.finish()
    assert freeze.finish() == "p v2"


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Any:
    yield
    leftovers = [t for t in threading.enumerate() if isinstance(t, Side) and t.is_alive()]
    assert not leftovers, leftovers
