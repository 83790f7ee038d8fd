"""``/widgets/{id}/assets``: images and favicons stored on S3 under ``assets/``."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Annotated

from fastapi import APIRouter, File, UploadFile, status
from sqlmodel import Session, select

from api_stub.deps import OrgDep, SessionDep, get_owned
from api_stub.errors import ApiError, bad_request, not_found
from api_stub.routes.widgets import get_live_widget
from api_stub.schemas.archive import AssetPublic
from worker.ids import new_id
from worker.models import Organization, Widget, WidgetAsset, utcnow
from worker.s3 import PermanentS3Error, S3Error, get_store
from worker.storage_keys import asset_key

router = APIRouter(prefix="/widgets", tags=["assets"])

MAX_ASSET_BYTES = 2 * 1024 * 1024
ALLOWED_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/webp",
        "image/svg+xml",
        "image/x-icon",
        "image/vnd.microsoft.icon",
    }
)


def _read_limited(upload: UploadFile) -> bytes:
    data = upload.file.read(MAX_ASSET_BYTES + 1)
    if len(data) > MAX_ASSET_BYTES:
        raise ApiError(413, f"asset larger than {MAX_ASSET_BYTES} bytes", {"file": "too large"})
    if not data:
        raise bad_request("asset is empty", {"file": "empty"})
    return data


def _storage_error(exc: S3Error) -> ApiError:
    return ApiError(500 if isinstance(exc, PermanentS3Error) else 503, f"asset storage: {exc}")


def _discard(session: Session, asset_id: str, key: str) -> None:
    """Remove an upload that must not stay: the object first, then its row."""
    with contextlib.suppress(S3Error):  # if this fails, the archive's prefix sweep removes it
        get_store().delete(key)
    row = session.get(WidgetAsset, asset_id)
    if row is not None:
        session.delete(row)
        session.commit()


@router.post("/{widget_id}/assets", status_code=status.HTTP_201_CREATED)
def upload_asset(
    widget_id: str, file: Annotated[UploadFile, File()], org: OrgDep, session: SessionDep
) -> AssetPublic:
    """Three steps, no transaction or lock across the S3 write: (1) commit the row as
    ``uploading``, so the object never exists without a record; (2) write the object;
    (3) mark it ``stored``, unless the widget was archived meanwhile (then both go)."""
    content_type = (file.content_type or "").split(";")[0].strip().lower()
    if content_type not in ALLOWED_CONTENT_TYPES:
        raise bad_request(
            f"content type '{content_type}' not allowed; allowed: "
            + ", ".join(sorted(ALLOWED_CONTENT_TYPES)),
            {"file": "content type not allowed"},
        )
    data = _read_limited(file)
    get_live_widget(session, org, widget_id)
    asset_id = new_id()
    asset = WidgetAsset(
        id=asset_id,
        organization_id=org.id,
        widget_id=widget_id,
        filename=(file.filename or "asset")[:255],
        content_type=content_type,
        size=len(data),
        s3_key=asset_key(org.api_key, widget_id, asset_id),
        checksum=hashlib.sha256(data).hexdigest(),
        status="uploading",
    )
    session.add(asset)
    session.commit()
    try:
        get_store().put_bytes(asset.s3_key, data, content_type=content_type)
    except S3Error as exc:
        _discard(session, asset_id, asset.s3_key)
        raise _storage_error(exc) from exc
    widget = session.get(Widget, widget_id, populate_existing=True)
    if widget is None or widget.is_archived:
        _discard(session, asset_id, asset.s3_key)
        raise not_found("widget", widget_id)
    stored = session.get(WidgetAsset, asset_id)
    if stored is None:  # the archive removed the row: make sure the object goes too
        _discard(session, asset_id, asset.s3_key)
        raise not_found("widget", widget_id)
    stored.status = "stored"
    stored.updated_at = utcnow()
    session.commit()
    return AssetPublic.model_validate(stored)


def _assets(session: Session, org: Organization, widget_id: str) -> list[WidgetAsset]:
    get_live_widget(session, org, widget_id)
    stmt = (
        select(WidgetAsset)
        .where(
            WidgetAsset.organization_id == org.id,
            WidgetAsset.widget_id == widget_id,
            WidgetAsset.status == "stored",
        )
        .order_by(WidgetAsset.created_at, WidgetAsset.id)  # type: ignore[arg-type]
    )
    return list(session.exec(stmt).all())


@router.get("/{widget_id}/assets")
def list_assets(widget_id: str, org: OrgDep, session: SessionDep) -> list[AssetPublic]:
    return [AssetPublic.model_validate(a) for a in _assets(session, org, widget_id)]


@router.delete("/{widget_id}/assets/{asset_id}")
def delete_asset(widget_id: str, asset_id: str, org: OrgDep, session: SessionDep) -> AssetPublic:
    get_live_widget(session, org, widget_id)
    asset = get_owned(session, WidgetAsset, org, asset_id, "asset")
    if asset.widget_id != widget_id:
        raise not_found("asset", asset_id)
    removed = AssetPublic.model_validate(asset)
    session.rollback()  # end the read transaction: nothing is held across the S3 call
    try:
        get_store().delete(asset.s3_key)  # object first: never a stored object without a row
    except S3Error as exc:
        raise _storage_error(exc) from exc
    row = session.get(WidgetAsset, asset.id)
    if row is not None:
        session.delete(row)
        session.commit()
    return removed
