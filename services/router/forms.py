"""Multipart forms whose text fields are decoded strictly: bytes that are not valid text are a 400.

Starlette decodes a multipart text field with the request's charset (UTF-8 unless the Content-Type says
otherwise) and, when the bytes are not valid in it, silently falls back to Latin-1. A question sent in
another encoding then reaches the model as mojibake and gets a confident answer to a question nobody
asked. The router's upload routes use ``StrictFormRoute`` instead: each text field is decoded with the
charset its part declares (``Content-Type: text/plain; charset=...``), else the request's, else UTF-8,
and a field that does not decode is refused with the error envelope, naming the field. File parts are
untouched (their bytes go to the image gate); so are field and file names, which the router never uses.

Only multipart bodies are parsed here: every route using it takes a file, which a url-encoded form
cannot carry (such a request is refused for the missing file whatever its text).
"""

from __future__ import annotations

import codecs
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from services.common.errors import InvalidInput

MULTIPART_FORM = b"multipart/form-data"
DEFAULT_CHARSET = "utf-8"


class TextEncodingError(InvalidInput):
    """400: a text field whose bytes are not valid in its charset (never re-decoded as something else)."""

    def __init__(self, field: str, charset: str, reason: str):
        name = "UTF-8" if codecs.lookup(charset).name == "utf-8" else charset
        super().__init__(
            f"'{field}' is not valid {name} text ({reason}); send text fields encoded as UTF-8",
            param=field,
        )


class UnknownCharset(InvalidInput):
    """400: a part or the request declares a charset Python does not know."""

    def __init__(self, field: str | None, charset: str):
        where = f"'{field}' declares" if field else "the request declares"
        super().__init__(f"{where} an unknown charset {charset!r}; send UTF-8", param=field)


def _charset(content_type: bytes | str | None) -> str | None:
    """The ``charset`` parameter of a Content-Type value, if any."""
    if not content_type:
        return None
    _, params = parse_options_header(content_type)
    value = params.get(b"charset", b"").decode("latin-1").strip()
    return value or None


def _check_charset(charset: str, field: str | None) -> str:
    try:
        return codecs.lookup(charset).name
    except LookupError:
        raise UnknownCharset(field, charset) from None


class StrictMultiPartParser(MultiPartParser):
    """Starlette's parser, with text fields decoded strictly instead of falling back to Latin-1."""

    def __init__(self, headers: Headers, *args: Any, **kwargs: Any) -> None:
        super().__init__(headers, *args, **kwargs)
        # Starlette maps an unknown request charset to Latin-1 too: check it ourselves.
        self.request_charset = _check_charset(_charset(headers.get("content-type")) or DEFAULT_CHARSET, None)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            super().on_part_end()
            return
        declared = _charset(dict(part.item_headers).get(b"content-type"))
        charset = _check_charset(declared, part.field_name) if declared else self.request_charset
        try:
            text = bytes(part.data).decode(charset)
        except UnicodeDecodeError as exc:
            reason = f"byte 0x{exc.object[exc.start]:02x} at position {exc.start}"
            raise TextEncodingError(part.field_name, charset, reason) from None
        self.items.append((part.field_name, text))


class StrictFormRequest(Request):
    """A request whose multipart form is parsed by ``StrictMultiPartParser``; other bodies as usual."""

    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("content-type"))
        if self._form is not None or content_type != MULTIPART_FORM:
            return await super()._get_form(
                max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
            )
        try:
            async with aclosing(self.stream()) as stream:
                parser = StrictMultiPartParser(
                    self.headers,
                    stream,
                    max_files=max_files,
                    max_fields=max_fields,
                    max_part_size=max_part_size,
                )
                self._form = await parser.parse()
        except MultiPartException as exc:  # as Starlette answers it: size and count limits, broken bodies
            raise HTTPException(status_code=400, detail=exc.message) from exc
        return self._form


class StrictFormRoute(APIRoute):
    """A route that reads its form with ``StrictFormRequest``.

    The form is parsed before FastAPI's handler runs: FastAPI would turn any error raised while it reads
    the body into a generic "There was an error parsing the body", losing the field name. The parsed form
    is cached on the request, so FastAPI then reads it without parsing again.

    ``checks_before_body`` run before a byte of the body is read (a subclass sets them): authentication
    belongs there, so that an unauthenticated caller gets 401 whatever it sent, and no server work.
    """

    checks_before_body: tuple[Callable[[Request], Awaitable[Any]], ...] = ()

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = self.checks_before_body

        async def strict_form_handler(request: Request) -> Response:
            request = StrictFormRequest(request.scope, request.receive)
            for check in checks:
                await check(request)
            await request.form()
            return await handler(request)

        return strict_form_handler
