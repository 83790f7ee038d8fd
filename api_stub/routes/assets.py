"""``/widgets/{id}/assets``: images and favicons stored on S3 under ``assets/``."""

from __future__ import annotations

import contextlib
import hashlib
import unicodedata
from typing import Annotated
from urllib.parse import quote

import puremagic
from fastapi import APIRouter, File, UploadFile, status
from sqlmodel import Session, select

from api_stub.deps import OrgDep, SessionDep, get_owned
from api_stub.errors import ApiError, bad_request, not_found
from api_stub.route_policy import MAX_ASSET_BYTES
from api_stub.routes.widgets import get_live_widget
from api_stub.schemas.archive import AssetPublic
from worker.ids import new_id
from worker.models import Organization, Widget, WidgetAsset, utcnow
from worker.s3 import PermanentS3Error, S3Error, get_store
from worker.storage_keys import asset_key

router = APIRouter(prefix="/widgets", tags=["assets"])

# What an asset may be, decided by its bytes (puremagic), never by the declared type alone.
# SVG is refused: it is a document that can carry scripts, and sanitizing it is not worth the
# risk for logos and icons (PNG or WebP do).
ALLOWED_CONTENT_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/gif", "image/webp", "image/x-icon"}
)
# Other names clients use for the same types.
_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/vnd.microsoft.icon": "image/x-icon",
    "image/ico": "image/x-icon",
}
# Declared types that say nothing (generated clients, curl -F): the bytes decide alone.
_GENERIC_TYPES = frozenset({"", "application/octet-stream"})
MAX_FILENAME_CHARS = 255
_FILENAME_FORBIDDEN = set('"\\/<>:|?*;')


def _canonical(content_type: str) -> str:
    base = content_type.split(";")[0].strip().lower()
    return _ALIASES.get(base, base)


def sniff_image(data: bytes) -> str | None:
    """The allowed image type the bytes are (most confident match first), else None."""
    try:
        matches = puremagic.magic_string(data)
    except puremagic.PureError:
        return None
    for match in sorted(matches, key=lambda m: -m.confidence):
        if _canonical(match.mime_type) in ALLOWED_CONTENT_TYPES:
            return _canonical(match.mime_type)
    return None


def _looks_like_svg(data: bytes) -> bool:
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:65536].lower()


def checked_content_type(declared: str | None, data: bytes) -> str:
    """The type the asset is stored as: sniffed from ``data``, and agreeing with ``declared``
    unless that is generic. Anything else is a 400 naming the file."""
    sniffed = sniff_image(data)
    if sniffed is None:
        reason = "SVG is not accepted" if _looks_like_svg(data) else "not a supported image"
        raise bad_request(
            f"{reason}; allowed: {', '.join(sorted(ALLOWED_CONTENT_TYPES))}",
            {"file": "content type not allowed"},
        )
    claimed = _canonical(declared or "")
    if claimed not in _GENERIC_TYPES and claimed != sniffed:
        raise bad_request(
            f"the file is declared '{claimed}' but its content is '{sniffed}'",
            {"file": "declared type does not match the content"},
        )
    return sniffed


def normalize_filename(raw: str | None) -> str:
    """A display name safe anywhere (a header, a download): the last path component, NFC,
    without control, format or path characters, at most 255 characters; ``asset`` if empty."""
    name = unicodedata.normalize("NFC", raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and c not in _FILENAME_FORBIDDEN)
    name = name.strip(" .")
    if len(name) > MAX_FILENAME_CHARS:
        _stem, dot, ext = name.rpartition(".")
        keep = ("." + ext) if dot and 0 < len(ext) <= 16 else ""
        name = name[: MAX_FILENAME_CHARS - len(keep)].rstrip(" .") + keep
    return name or "asset"


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact one (RFC 6266 / RFC 5987)."""
    fallback = "".join(c if c.isascii() and c.isprintable() else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _read_limited(upload: UploadFile) -> bytes:
    data = upload.file.read(MAX_ASSET_BYTES + 1)
    if len(data) > MAX_ASSET_BYTES:
        raise ApiError(413, f"asset larger than {MAX_ASSET_BYTES} bytes", {"file": "too large"})
    if not data:
        raise bad_request("asset is empty", {"file": "empty"})
    return data


def _put_asset(key: str, data: bytes, content_type: str, filename: str) -> None:
    """Store the object, served as a download (``Content-Disposition: attachment``)."""
    get_store().put_bytes(
        key, data, content_type=content_type, content_disposition=content_disposition(filename)
    )


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


@router.post(
    "/{widget_id}/assets",
    status_code=status.HTTP_201_CREATED,
    form_limits={"max_files": 1, "max_fields": 0},  # one file per upload, nothing else
)
def upload_asset(
    widget_id: str, file: Annotated[UploadFile, File()], org: OrgDep, session: SessionDep
) -> AssetPublic:
    """Three steps, no transaction or lock across the S3 write: (1) commit the row as
    ``uploading``, so the object never exists without a record; (2) write the object;
    (3) mark it ``stored``, unless the widget was archived meanwhile (then both go)."""
    data = _read_limited(file)
    content_type = checked_content_type(file.content_type, data)
    filename = normalize_filename(file.filename)
    get_live_widget(session, org, widget_id)
    asset_id = new_id()
    asset = WidgetAsset(
        id=asset_id,
        organization_id=org.id,
        widget_id=widget_id,
        filename=filename,
        content_type=content_type,
        size=len(data),
        s3_key=asset_key(org.api_key, widget_id, asset_id),
        checksum=hashlib.sha256(data).hexdigest(),
        status="uploading",
    )
    session.add(asset)
    session.commit()
    try:
        _put_asset(asset.s3_key, data, content_type, filename)
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
