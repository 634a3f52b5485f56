"""Files: private to their owner (and to users with MANAGE_ANY_FILE); anyone else is told
they do not exist.

An upload is written to a staged blob as it arrives, checked, and only then committed
under a generated key and recorded. Whatever fails before the row is committed leaves
neither a blob nor a row behind. A batch streams its files the same way, each into its
own staged blob; each file is accepted or refused on its own.
"""

import asyncio
import contextlib
import functools
import hashlib
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar, cast

import anyio
import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import ClientDisconnect

from app.backends.storage import BlobInfo, StagedBlob, Storage, StorageFull, new_key
from app.errors import (
    AppError,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnprocessableContent,
)
from app.files import images, multipart, rules
from app.files.models import StoredFile
from app.files.schemas import MAX_DESCRIPTION_CHARS, FileRead
from app.observability.logging import get_logger
from app.observability.metrics import THUMBNAIL_DURATION, UPLOAD_BYTES, UPLOADS
from app.pagination import Page, PageParams, fetch_page, matching
from app.settings import Settings
from app.users.models import Permission, User

logger = get_logger(__name__)

# Room for the multipart framing and the description around the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Each sweep first touches its own process's open stages (Storage.remove_stale_stages),
# every SWEEP_INTERVAL_SECONDS: an hour untouched is an upload whose process died.
STALE_STAGE_SECONDS = 3600
SWEEP_INTERVAL_SECONDS = 600


THUMBNAIL_SUFFIX = "-thumb"


def thumbnail_key(storage_key: str) -> str:
    return f"{storage_key}{THUMBNAIL_SUFFIX}"


@dataclass
class _IncomingFile:
    """A file part as it streams into its staged blob (which hashes it): counted, probed."""

    blob: StagedBlob
    max_bytes: int
    filename: str
    declared_type: str | None
    size: int = 0
    head: bytearray = field(default_factory=bytearray)
    # None once the head shows an allowed binary type's signature: the type is settled,
    # text or not. A refused type's is no proof (rules.detect: text may open like one).
    text: rules.TextProbe | None = field(default_factory=rules.TextProbe)
    error: AppError | None = None  # in a batch: this file failed, the others go on

    async def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(f"The file is larger than {self.max_bytes} bytes.")
        if len(self.head) < rules.SNIFF_BYTES:
            self.head += chunk[: rules.SNIFF_BYTES - len(self.head)]
            if (
                len(self.head) == rules.SNIFF_BYTES
                and rules.detect(bytes(self.head), False) in rules.EXTENSIONS
            ):
                self.text = None
        if self.text is not None:
            self.text.feed(chunk)
        await self.blob.write(chunk)

    def is_text(self) -> bool:
        return self.text is not None and self.text.is_text()


@dataclass(frozen=True)
class BatchResult:
    """One file of a batch: its record, or the error it was refused with."""

    filename: str
    record: StoredFile | None = None
    error: AppError | None = None


@dataclass
class _LoopUploads:
    """What the uploads of one event loop share: of one worker process (of one app, in
    tests, which run each in a loop of its own)."""

    # The uploads running. A stopping worker's server cancels those it cannot wait for,
    # and may end the process as soon as the app's shutdown is over: the shutdown first
    # lets them finish cleaning up (drain_uploads), or their staged files and outcomes
    # are lost.
    running: set[asyncio.Task[object]] = field(default_factory=set)
    # An image takes up to max_image_memory_bytes (320 MiB by default): without
    # a bound of their own, images would be decoded as many at a time as the thread pool
    # has threads (40), enough to have a worker killed for its memory.
    image_limiter: anyio.CapacityLimiter | None = None


_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopUploads] = (
    weakref.WeakKeyDictionary()
)
P = ParamSpec("P")
T = TypeVar("T")


def _this_loop() -> _LoopUploads:
    loop = asyncio.get_running_loop()
    uploads = _loops.get(loop)
    if uploads is None:
        uploads = _loops[loop] = _LoopUploads()
    return uploads


def _drained(handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(handler)
    async def tracked(*args: P.args, **kwargs: P.kwargs) -> T:
        running = _this_loop().running
        task = cast(asyncio.Task[object], asyncio.current_task())  # a request runs in one
        running.add(task)
        try:
            return await handler(*args, **kwargs)
        finally:
            running.discard(task)

    return tracked


def _image_limiter(concurrency: int) -> anyio.CapacityLimiter:
    uploads = _this_loop()
    if uploads.image_limiter is None:
        uploads.image_limiter = anyio.CapacityLimiter(concurrency)
    return uploads.image_limiter


async def drain_uploads(timeout_seconds: float) -> None:
    """Wait, at most this long, for this event loop's uploads to end."""
    if running := _this_loop().running:
        await asyncio.wait(set(running), timeout=timeout_seconds)


@_drained
async def upload(
    session: AsyncSession,
    storage: Storage,
    settings: Settings,
    owner: User,
    body: multipart.FormBody,
) -> StoredFile:
    await _release_connection(session)
    try:
        async with _full_storage_refused(), contextlib.AsyncExitStack() as stages:
            files, description = await _receive(stages, storage, body, settings, max_files=1)
            if not files:
                raise UnprocessableContent("The form has no 'file' part.")
            record = await _store(storage, settings, owner, files[0], description)
    except _COUNTED as exc:
        UPLOADS.labels(_outcome(exc)).inc()
        raise
    await _save(session, storage, [record])
    return record


@_drained
async def upload_batch(
    session: AsyncSession,
    storage: Storage,
    settings: Settings,
    owner: User,
    body: multipart.FormBody,
) -> list[BatchResult]:
    """Each file succeeds or fails on its own; a malformed or oversized form, or a full
    storage, fails whole."""
    await _release_connection(session)
    results: list[BatchResult] = []
    try:
        async with _full_storage_refused(), contextlib.AsyncExitStack() as stages:
            files, description = await _receive(
                stages, storage, body, settings, max_files=settings.max_batch_files
            )
            if not files:
                raise UnprocessableContent("The form has no 'file' part.")
            for incoming in files:
                try:
                    if incoming.error is not None:
                        raise incoming.error
                    record = await _store(storage, settings, owner, incoming, description)
                except AppError as exc:
                    UPLOADS.labels(_outcome(exc)).inc()
                    results.append(BatchResult(incoming.filename, error=exc))
                else:
                    results.append(BatchResult(incoming.filename, record=record))
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await _delete_blobs(storage, [r.record for r in results if r.record is not None])
        # The form as a whole failed (abandoned, refused) rather than one of its files.
        if isinstance(exc, _COUNTED):
            UPLOADS.labels(_outcome(exc)).inc()
        raise
    await _save(session, storage, [r.record for r in results if r.record is not None])
    return results


async def _release_connection(session: AsyncSession) -> None:
    """End the transaction that authenticating the caller began, before bytes move: it
    holds a pooled database connection, and an upload's body may take minutes to arrive
    (a slow link, or a client trickling bytes on purpose), a download as long to leave,
    so a few dozen of them would hold the whole pool and every other request would wait
    for it. ``expire_on_commit=False`` keeps the rows loaded; an upload writes its own
    in a transaction of its own."""
    await session.commit()


@contextlib.asynccontextmanager
async def _full_storage_refused() -> AsyncIterator[None]:
    """A full storage is the server's condition, not the client's doing: a 507 for the
    client, and a warning for the operator (the access line only shows the status). The
    staged blobs are gone by then (their stages close inside this)."""
    try:
        yield
    except StorageFull as exc:
        logger.warning("upload refused: the storage is full", error=str(exc))
        raise InsufficientStorage(
            "The server has no room for this upload now; try again later."
        ) from exc


async def _save(session: AsyncSession, storage: Storage, records: list[StoredFile]) -> None:
    """Record committed blobs; if that fails, the blobs go too (no orphan, no dangling row)."""
    try:
        session.add_all(records)
        await session.commit()
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await _delete_blobs(storage, records)
        if isinstance(exc, IntegrityError):  # the owner was deleted while the body arrived
            UPLOADS.labels("aborted").inc(len(records))
            raise Unauthorized("The account no longer exists.") from None
        raise
    UPLOAD_BYTES.inc(sum(record.size for record in records))
    UPLOADS.labels("ok").inc(len(records))


async def _delete_blobs(storage: Storage, records: list[StoredFile]) -> None:
    await storage.delete(
        *(key for r in records for key in (r.storage_key, thumbnail_key(r.storage_key)))
    )


async def _store(
    storage: Storage,
    settings: Settings,
    owner: User,
    incoming: _IncomingFile,
    description: str | None,
) -> StoredFile:
    """Check a received file and commit its blobs; on any failure none of them remain."""
    detected = rules.check_type(
        rules.detect(bytes(incoming.head), incoming.is_text()),
        incoming.filename,
        incoming.declared_type,
    )
    key = new_key()
    record = StoredFile(
        owner_id=owner.id,
        original_name=incoming.filename,
        content_type=detected,
        size=incoming.size,
        has_thumbnail=False,
        description=description,
        storage_key=key,
    )
    committed: list[str] = []
    try:
        if detected in images.PIL_FORMATS:
            processed = await _process_image(incoming.blob, detected, settings)
            await _put(storage, thumbnail_key(key), processed.thumbnail)
            committed.append(thumbnail_key(key))
            await _put(storage, key, processed.cleaned)
            committed.append(key)
            record.has_thumbnail = True
            record.size = len(processed.cleaned)
            record.sha256 = hashlib.sha256(processed.cleaned).hexdigest()
        else:
            await incoming.blob.commit(key)
            committed.append(key)
            # Asked after the commit, whose thread hop wrote (and hashed) the last bytes:
            # asked before, it would cost a hop of its own.
            record.sha256 = await incoming.blob.sha256_hex()
    except BaseException:
        # Cancellation included (a client gone mid-request): the blobs must still go.
        with anyio.CancelScope(shield=True):
            await storage.delete(*committed)
        raise
    return record


async def _receive(
    stages: contextlib.AsyncExitStack,
    storage: Storage,
    body: multipart.FormBody,
    settings: Settings,
    *,
    max_files: int,
) -> tuple[list[_IncomingFile], str | None]:
    """Stream the form's ``file`` parts into staged blobs (discarded when ``stages``
    closes, unless committed) and read the optional ``description``.

    A single upload stops at the first file error; a batch notes it on the file and reads on.
    """
    files: list[_IncomingFile] = []
    description: bytearray | None = None
    current: _IncomingFile | bytearray | _NoFileChosen | None = None
    file_parts = 0  # inputs left empty included: each costs parsing, if not storage
    limit = max_files * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    events = multipart.events(body, limit)
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, multipart.PartStart):
                if event.name == "file" and event.filename is not None:
                    if file_parts == max_files:
                        raise multipart.MalformedBody(f"At most {max_files} file(s) per request.")
                    file_parts += 1
                    if event.filename == "":
                        current = _NO_FILE_CHOSEN
                        continue
                    blob = await stages.enter_async_context(storage.stage())
                    current = _IncomingFile(
                        blob,
                        settings.max_upload_bytes,
                        rules.sanitize_filename(event.filename),
                        event.content_type,
                    )
                    files.append(current)
                elif event.name == "description" and description is None:
                    current = description = bytearray()
                else:
                    raise multipart.MalformedBody(
                        "Expected 'file' parts and an optional 'description'."
                    )
            elif isinstance(event, bytes):
                if isinstance(current, _IncomingFile):
                    await _feed(current, event, abort=max_files == 1)
                elif isinstance(current, _NoFileChosen):
                    if event:
                        raise multipart.MalformedBody("A 'file' part has content but no name.")
                elif current is not None:
                    current += event
                    # 4 bytes per character at most in UTF-8: stop buffering early.
                    if len(current) > 4 * MAX_DESCRIPTION_CHARS:
                        raise _description_too_long()
            else:
                current = None
    return files, _description(description)


class _NoFileChosen:
    """A ``file`` part with an empty file name: what a browser sends for a file input left
    empty. It is no file (the form may have others); with content, it is malformed."""


_NO_FILE_CHOSEN = _NoFileChosen()


async def _feed(incoming: _IncomingFile, chunk: bytes, *, abort: bool) -> None:
    if incoming.error is not None:
        return  # already refused: the rest of its bytes are read past, not kept
    try:
        await incoming.feed(chunk)
    except PayloadTooLarge as exc:
        if abort:
            raise
        incoming.error = exc


def _description(raw: bytearray | None) -> str | None:
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnprocessableContent("The description is not valid UTF-8.") from None
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise _description_too_long()
    if "\x00" in text:  # as app.db.WithoutNul refuses it in JSON bodies
        raise UnprocessableContent("The description contains a NUL character.")
    return text or None


def _description_too_long() -> UnprocessableContent:
    return UnprocessableContent(
        f"The description is longer than {MAX_DESCRIPTION_CHARS} characters."
    )


async def _process_image(
    blob: StagedBlob, content_type: str, settings: Settings
) -> images.ProcessedImage:
    started = time.perf_counter()
    try:
        path = await blob.local_file()
        return await anyio.to_thread.run_sync(
            images.process,
            path,
            content_type,
            settings.max_image_pixels,
            settings.max_image_memory_bytes,
            limiter=_image_limiter(settings.image_concurrency),
        )
    except images.ImageRejected as exc:
        raise UnprocessableContent(exc.detail) from exc
    finally:
        THUMBNAIL_DURATION.observe(time.perf_counter() - started)


async def _put(storage: Storage, key: str, data: bytes) -> None:
    async with storage.stage() as blob:
        await blob.write(data)
        await blob.commit(key)


# What ends an upload with an outcome of its own: refused, or abandoned (by its client, or
# by a worker that stopped under it, cancelled at the end of its graceful shutdown).
_COUNTED = (AppError, ClientDisconnect, asyncio.CancelledError)


def _outcome(exc: AppError | ClientDisconnect | asyncio.CancelledError) -> str:
    """A bounded label for a refused or abandoned upload: abandoned by its client, or by a
    worker that stopped under it (cancelled at the end of its graceful shutdown)."""
    if isinstance(exc, ClientDisconnect | asyncio.CancelledError):
        return "aborted"
    if isinstance(exc, PayloadTooLarge):
        return "too_large"
    if isinstance(exc, InsufficientStorage):
        return "no_space"
    if exc.status_code == 415 and not isinstance(exc, multipart.NotMultipart):
        return "bad_type"
    if isinstance(exc.__cause__, images.ImageRejected):
        return exc.__cause__.reason
    return "invalid"


async def sweep_stale_stages(storage: Storage) -> None:
    """At start and every SWEEP_INTERVAL_SECONDS, until cancelled: remove the staged files
    of uploads cut short by a crash or a kill (an OOM kill, a lost node), which nothing
    else would ever remove and which fill the volume. Every worker sweeps; they share it."""
    while True:
        try:
            removed = await storage.remove_stale_stages(STALE_STAGE_SECONDS)
        except Exception:
            logger.warning("upload staging sweep failed", exc_info=True)
        else:
            if removed:
                logger.info("removed stale staged uploads", count=removed)
        await anyio.sleep(SWEEP_INTERVAL_SECONDS)


async def page(session: AsyncSession, owner: User, params: PageParams) -> Page[FileRead]:
    """The caller's own files, admins included: the list is a personal view."""
    query = select(StoredFile).where(StoredFile.owner_id == owner.id)
    search = matching(params.q, StoredFile.original_name, StoredFile.description)
    files, total = await fetch_page(session, query, StoredFile.id, params, search)
    return Page[FileRead].build(files, total, params)


async def visible_file(session: AsyncSession, actor: User, file_id: int) -> StoredFile:
    """The file if ``actor`` may see it; otherwise the same 404 as a missing one."""
    record = await session.get(StoredFile, file_id)
    if record is None or (
        record.owner_id != actor.id and not actor.has_permission(Permission.MANAGE_ANY_FILE)
    ):
        raise NotFound("File not found.")
    return record


async def file_to_send(session: AsyncSession, actor: User, file_id: int) -> StoredFile:
    """``visible_file``, with the database connection released: the download that follows
    may stream for minutes to a slow client, as an upload may arrive (see
    ``_release_connection``)."""
    record = await visible_file(session, actor, file_id)
    await _release_connection(session)
    return record


async def delete(session: AsyncSession, storage: Storage, actor: User, file_id: int) -> None:
    record = await visible_file(session, actor, file_id)
    await session.delete(record)
    await session.commit()
    # After the commit: a crash in between leaves an orphan blob, never a row without bytes.
    await storage.delete(record.storage_key, thumbnail_key(record.storage_key))


async def owned_files(session: AsyncSession, owner_id: int) -> list[StoredFile]:
    return list(await session.scalars(select(StoredFile).where(StoredFile.owner_id == owner_id)))


async def delete_blobs(storage: Storage, records: list[StoredFile]) -> None:
    """Remove the stored bytes (and thumbnails) of rows already deleted."""
    await _delete_blobs(storage, records)


async def prune_orphans(
    session: AsyncSession, storage: Storage, older_than_seconds: float, *, dry_run: bool = False
) -> AsyncIterator[BlobInfo]:
    """Remove, and yield, the blobs (thumbnails included) that no file's row refers to and
    that were committed that long ago: what a process killed between committing an
    upload's bytes and its row, or between deleting a row and its bytes, leaves behind,
    and nothing else ever removes. An upload writes its row seconds after its bytes, so
    the age keeps its blobs out of reach until then."""
    async for batch in storage.blobs(older_than_seconds):
        owners = {blob.key.removesuffix(THUMBNAIL_SUFFIX) for blob in batch}
        referred = set(
            await session.scalars(
                select(StoredFile.storage_key).where(StoredFile.storage_key.in_(owners))
            )
        )
        await session.commit()  # no transaction held while the files go
        orphans = [
            blob for blob in batch if blob.key.removesuffix(THUMBNAIL_SUFFIX) not in referred
        ]
        if orphans and not dry_run:
            await storage.delete(*(blob.key for blob in orphans))
        for blob in orphans:
            yield blob
