"""Freezing a widget into a deployment snapshot, and its canonical bytes.

The snapshot resolves the widget's selected purposes and preferences (with their values), each
with its ``metadata``, in the order the widget selected them. Serialization is canonical (sorted
keys, no whitespace, UTF-8), so the same content always gives the same bytes and checksum.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlmodel import Session, col, select

from worker.models import Preference, PreferenceValue, Purpose, Widget

SNAPSHOT_SCHEMA_VERSION = 1
# Keys of the snapshot that identify the deployment rather than the widget's content.
_IDENTITY_KEYS = ("deployment_id", "version")


def canonical_json(value: Any) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON; a published file must parse on every website.
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_checksum(config: dict[str, Any]) -> str:
    """Checksum of what websites see, ignoring which deployment and version carried it."""
    content = {k: v for k, v in config.items() if k not in _IDENTITY_KEYS}
    return sha256_hex(canonical_json(content))


def _widget_fields(widget: Widget) -> dict[str, Any]:
    return {
        "id": widget.id,
        "name": widget.name,
        "format": widget.format,
        "template_id": widget.template_id,
        "headless": widget.headless,
        "layout_shape": widget.layout_shape,
        "theme_id": widget.theme_id,
        "enabled_languages": list(widget.enabled_languages),
        "default_language": widget.default_language,
        "domain": widget.domain,
        "selected_purposes_ids": list(widget.selected_purposes_ids),
        "selected_preferences_ids": list(widget.selected_preferences_ids),
        "components": widget.components,
    }


def _purposes(session: Session, widget: Widget) -> list[dict[str, Any]]:
    ids = list(widget.selected_purposes_ids)
    if not ids:
        return []
    rows = session.exec(
        select(Purpose).where(
            col(Purpose.id).in_(ids), Purpose.organization_id == widget.organization_id
        )
    ).all()
    by_id = {p.id: p for p in rows}
    # A purpose deleted since it was selected is left out rather than failing the deploy.
    return [
        {"id": p.id, "description": p.description, "metadata": p.metadata_}
        for p in (by_id.get(i) for i in ids)
        if p is not None
    ]


def _preferences(session: Session, widget: Widget) -> list[dict[str, Any]]:
    ids = list(widget.selected_preferences_ids)
    if not ids:
        return []
    # One statement: each preference with its values (a preference without values once).
    rows = session.exec(
        select(Preference, PreferenceValue)
        .outerjoin(PreferenceValue, col(PreferenceValue.preference_id) == col(Preference.id))
        .where(col(Preference.id).in_(ids), Preference.organization_id == widget.organization_id)
        .order_by(col(PreferenceValue.order), col(PreferenceValue.id))
    ).all()
    by_id: dict[str, Preference] = {}
    values_by_pref: dict[str, list[dict[str, Any]]] = {}
    for p, v in rows:
        by_id[p.id] = p
        if v is not None:
            values_by_pref.setdefault(p.id, []).append(
                {"id": v.id, "name": v.name, "metadata": v.metadata_, "order": v.order}
            )
    return [
        {
            "id": p.id,
            "name": p.name,
            "description": p.description,
            "type": p.type,
            "metadata": p.metadata_,
            "values": values_by_pref.get(p.id, []),
        }
        for p in (by_id.get(i) for i in ids)
        if p is not None
    ]


def build_snapshot(session: Session, widget: Widget, deployment_id: str) -> dict[str, Any]:
    """The frozen configuration of ``widget`` as deployment ``deployment_id`` publishes it."""
    return {
        "schema_version": SNAPSHOT_SCHEMA_VERSION,
        "deployment_id": deployment_id,
        "organization_id": widget.organization_id,
        "widget_id": widget.id,
        "version": widget.version,
        "widget": _widget_fields(widget),
        "purposes": _purposes(session, widget),
        "preferences": _preferences(session, widget),
    }
