"""Where things live in the bucket. Only validated IDs go into a key, never a client's string."""

from __future__ import annotations

from worker.ids import require_safe_id


def container_key(api_key: str, widget_id: str) -> str:
    """Where websites load a widget from (DESIGN): configs/{api_key}/containers/{widget_id}.json."""
    require_safe_id(api_key, "api_key")
    require_safe_id(widget_id, "widget_id")
    return f"configs/{api_key}/containers/{widget_id}.json"


def preview_key(api_key: str, widget_id: str) -> str:
    """A preview deployment's object: beside the containers, never the file websites load."""
    require_safe_id(api_key, "api_key")
    require_safe_id(widget_id, "widget_id")
    return f"configs/{api_key}/preview/{widget_id}.json"


def target_key(target: str, api_key: str, widget_id: str) -> str:
    """Where a deployment of ``target`` (``production`` or ``preview``) publishes."""
    if target == "preview":
        return preview_key(api_key, widget_id)
    return container_key(api_key, widget_id)


def asset_prefix(api_key: str, widget_id: str) -> str:
    """Every asset object of one widget is under this prefix (the archive sweeps it)."""
    require_safe_id(api_key, "api_key")
    require_safe_id(widget_id, "widget_id")
    return f"assets/{api_key}/{widget_id}/"


def asset_key(api_key: str, widget_id: str, asset_id: str) -> str:
    """The client's file name is kept in the row, not in the path."""
    require_safe_id(asset_id, "asset_id")
    return asset_prefix(api_key, widget_id) + asset_id
