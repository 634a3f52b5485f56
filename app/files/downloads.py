"""The response that serves a stored file, Range requests included.

Starlette's FileResponse answers Range requests (206, multipart/byteranges for several
ranges, overlapping ranges merged, more than 100 ignored) but refuses a bad one with a
text/plain 400 or 416, unlike every other error of the service, and refuses a range
unit it does not know where RFC 9110 §14.2 says to ignore it. This subclass changes
those two answers only; its range parsing stays Starlette's, and tests/test_files.py
pins the result in case Starlette changes it.
"""

from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable

from app.errors import AppError, UnsatisfiableRange


class MalformedRange(AppError):
    """400: a bytes Range header that is not one."""


class Download(FileResponse):
    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        unit = http_range.partition("=")[0].strip().lower()
        if unit != "bytes":
            return []  # no ranges: the whole file, 200
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader as exc:
            raise MalformedRange("The Range header is not a valid bytes range.") from exc
        except RangeNotSatisfiable as exc:
            # Raised before the response starts, so the app's error handler renders it.
            raise UnsatisfiableRange(
                "The range starts beyond the end of the file.",
                headers={"Content-Range": f"bytes */{exc.max_size}"},
            ) from exc
