from pathlib import PurePosixPath

import anyio.to_thread
from fastapi import APIRouter, Depends, Request, Response, status
from starlette.responses import StreamingResponse

from app.auth.deps import CurrentUser
from app.backends.storage import Storage
from app.db import IdPath, SessionDep
from app.errors import NotFound
from app.files import images, rules, service
from app.files.deps import StorageDep, upload_limit
from app.files.downloads import Download
from app.files.multipart import FormBody
from app.files.schemas import BatchItem, BatchRead, FileRead
from app.observability.logging import get_logger
from app.pagination import Page, PageParamsDep
from app.settings import SettingsDep

router = APIRouter(prefix="/files", tags=["files"])
logger = get_logger(__name__)


def multipart_body(file_schema: dict[str, object]) -> dict[str, object]:
    """The body is read as a stream by the service, so FastAPI cannot derive its schema."""
    properties = {"file": file_schema, "description": {"type": "string", "maxLength": 500}}
    schema = {"type": "object", "required": ["file"], "properties": properties}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


BINARY = {"type": "string", "format": "binary"}


async def blob_response(storage: Storage, key: str, media_type: str, filename: str) -> Response:
    headers = {
        "Content-Disposition": rules.content_disposition(filename),
        "X-Content-Type-Options": "nosniff",
    }
    path = storage.local_path(key)
    if path is not None:
        try:
            file = await anyio.to_thread.run_sync(open, path, "rb")
        except FileNotFoundError:  # deleted since its row was read, or lost with its volume
            logger.warning("download: the file's blob is gone", key=key)
            raise NotFound("File not found.") from None
        # Answers Range requests (206) and sends the file in chunks.
        return Download(file, media_type=media_type, headers=headers)
    return StreamingResponse(storage.read(key), media_type=media_type, headers=headers)


def batch_item(result: service.BatchResult) -> BatchItem:
    if result.error is not None:
        return BatchItem(
            filename=result.filename, status=result.error.status_code, detail=result.error.detail
        )
    return BatchItem(
        filename=result.filename, status=201, file=FileRead.model_validate(result.record)
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=FileRead,
    dependencies=[Depends(upload_limit)],
    openapi_extra=multipart_body(BINARY),
)
async def upload_file(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> object:
    return await service.upload(session, storage, settings, user, FormBody.of(request))


@router.post(
    "/batch",
    status_code=status.HTTP_207_MULTI_STATUS,
    response_model=BatchRead,
    dependencies=[Depends(upload_limit)],
    openapi_extra=multipart_body({"type": "array", "items": BINARY, "maxItems": 10}),
)
async def upload_batch(
    request: Request,
    user: CurrentUser,
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> BatchRead:
    results = await service.upload_batch(session, storage, settings, user, FormBody.of(request))
    return BatchRead(results=[batch_item(result) for result in results])


@router.get("", response_model=Page[FileRead])
async def list_files(user: CurrentUser, session: SessionDep, page: PageParamsDep) -> object:
    return await service.page(session, user, page)


@router.get("/{file_id}", response_model=FileRead)
async def read_file(file_id: IdPath, user: CurrentUser, session: SessionDep) -> object:
    return await service.visible_file(session, user, file_id)


@router.get("/{file_id}/content", response_class=Response)
async def download_file(
    file_id: IdPath, user: CurrentUser, session: SessionDep, storage: StorageDep
) -> Response:
    record = await service.file_to_send(session, user, file_id)
    return await blob_response(
        storage, record.storage_key, record.content_type, record.original_name
    )


@router.get("/{file_id}/thumbnail", response_class=Response)
async def download_thumbnail(
    file_id: IdPath, user: CurrentUser, session: SessionDep, storage: StorageDep
) -> Response:
    record = await service.file_to_send(session, user, file_id)
    if not record.has_thumbnail:
        raise NotFound("This file has no thumbnail.")
    media_type = images.thumbnail_type(record.content_type)
    suffix = ".jpg" if media_type == "image/jpeg" else ".png"
    name = f"{PurePosixPath(record.original_name).stem}-thumbnail{suffix}"
    return await blob_response(storage, service.thumbnail_key(record.storage_key), media_type, name)


@router.delete("/{file_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
async def delete_file(
    file_id: IdPath, user: CurrentUser, session: SessionDep, storage: StorageDep
) -> None:
    await service.delete(session, storage, user, file_id)
