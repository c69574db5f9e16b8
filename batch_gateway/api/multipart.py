"""Streaming multipart/form-data: the file part goes straight to its consumer, never into memory.

Litestar's own form parsing buffers the whole body, which an upload of hundreds of megabytes must not do. This reads
`request.stream()` through the sans-IO `PushMultipartParser` of the `multipart` package. Fields are matched by name in
any order; small text fields are kept, and the file part is handed to a callback as an async stream of chunks while it
arrives (the callback writes it to object storage). Size limits are enforced on the bytes as they arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from litestar import Request
from litestar.exceptions import HTTPException
from multipart import MultipartError, MultipartSegment, ParserLimitReached, PushMultipartParser, parse_options_header

from batch_gateway.api.file_policy import file_too_large
from batch_gateway.errors import ApiError, InvalidRequest

# Room for the multipart framing and the small text fields on top of the file itself.
FORM_OVERHEAD_BYTES = 1024 * 1024
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 64


@dataclass
class FilePart:
    name: str
    filename: str | None
    content_type: str | None
    fields_before: dict[str, str]  # the text fields that arrived before the file


FileConsumer = Callable[[FilePart, AsyncIterator[bytes]], Awaitable[None]]
TooLarge = Callable[[int], ApiError]


async def read_form(
    request: Request,
    *,
    max_file_bytes: int,
    on_file: FileConsumer,
    file_field: str = "file",
    too_large: TooLarge = file_too_large,
) -> tuple[dict[str, str], bool]:
    """Parse the form, calling `on_file` for the file part. Returns the text fields (first value wins) and whether a
    file part was seen. `on_file` must consume its stream to the end unless it raises. A file part over
    `max_file_bytes` gets the error `too_large(max_file_bytes)`."""
    boundary = _boundary(request.headers.get("content-type"))
    max_body = max_file_bytes + FORM_OVERHEAD_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise too_large(max_file_bytes)

    parser = PushMultipartParser(
        boundary, max_header_count=16, max_segment_count=MAX_PARTS, max_segment_size=max_file_bytes + 1
    )
    events = _events(request, parser, max_body=max_body, too_large=lambda: too_large(max_file_bytes))
    fields: dict[str, str] = {}
    file_seen = False
    async for event in events:
        if not isinstance(event, MultipartSegment):  # pragma: no cover - the helpers below consume whole parts
            continue
        if event.name == file_field:
            if file_seen:
                raise InvalidRequest("Only one file may be uploaded per request.", param=file_field)
            file_seen = True
            part = FilePart(event.name, event.filename, event.content_type, dict(fields))
            await on_file(part, _part_chunks(events, max_file_bytes, too_large))
        else:
            value = await _read_field(events, event.name)
            fields.setdefault(event.name, value)
    return fields, file_seen


def _boundary(content_type: str | None) -> str:
    mime, options = parse_options_header(content_type or "")
    boundary = options.get("boundary")
    if mime != "multipart/form-data" or not boundary:
        raise InvalidRequest("The request must be multipart/form-data (with a boundary) to upload a file.")
    return boundary


async def _events(
    request: Request, parser: PushMultipartParser, *, max_body: int, too_large: Callable[[], ApiError]
) -> AsyncIterator[MultipartSegment | bytes | None]:
    """Parser events from the request body, with every failure turned into a 4xx the client can act on."""
    received = 0
    try:
        async for chunk in request.stream():
            if not chunk:
                continue
            received += len(chunk)
            if received > max_body:
                raise too_large()
            for event in parser.parse(chunk):
                yield event
        for event in parser.parse(b""):  # end of input: raises if the form was cut short
            yield event
    except ParserLimitReached as exc:
        if "segment size" in str(exc).lower():
            raise too_large() from exc
        raise InvalidRequest(f"Could not parse the multipart/form-data body: {exc}.") from exc
    except MultipartError as exc:
        raise InvalidRequest(f"Could not parse the multipart/form-data body: {exc}.") from exc
    except HTTPException as exc:
        # Litestar raises this when the client disconnects mid-upload; nobody reads the answer, but it is no 500.
        raise InvalidRequest(f"The upload did not complete: {exc.detail}.") from exc


async def _part_chunks(
    events: AsyncIterator[MultipartSegment | bytes | None], limit: int, too_large: TooLarge
) -> AsyncIterator[bytes]:
    """The body of the current part, ending at its end, with the per-file size limit applied."""
    size = 0
    async for event in events:
        if event is None:
            return
        if isinstance(event, bytes | bytearray):
            size += len(event)
            if size > limit:
                raise too_large(limit)
            yield bytes(event)
    raise InvalidRequest("Could not parse the multipart/form-data body: the file part is incomplete.")


async def _read_field(events: AsyncIterator[MultipartSegment | bytes | None], name: str) -> str:
    parts: list[bytes] = []
    size = 0
    async for event in events:
        if event is None:
            break
        if isinstance(event, bytes | bytearray):
            size += len(event)
            if size > MAX_FIELD_BYTES:
                raise InvalidRequest(f"Form field '{name}' is too long (at most {MAX_FIELD_BYTES} bytes).", param=name)
            parts.append(bytes(event))
    try:
        return b"".join(parts).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"Form field '{name}' is not valid UTF-8.", param=name) from exc
