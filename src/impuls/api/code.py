"""``GET /code/{name}``: a function's package as a zip, for the signed links GetFunction hands out."""

from __future__ import annotations

import io
import zipfile

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from impuls.api import contract as c
from impuls.api.deps import platform_of
from impuls.functions.models import Function
from impuls.platform import Platform

router = APIRouter()


@router.get("/code/{name}", responses={
    **c.answers(None, 404), 200: {"description": "the package as a zip",
                                  "content": {"application/zip": {"schema": {"type": "string",
                                                                             "format": "binary"}}}}})
async def download(request: Request, name: str, version: str = Query(...), expires: str = Query(...),
                   signature: str = Query(...)) -> Response:
    p = platform_of(request)
    p.code_links.check(name, version, expires, signature)
    data = await run_in_threadpool(_zip_of, p, await run_in_threadpool(p.registry.get, name, version))
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})


def _zip_of(p: Platform, fn: Function) -> bytes:
    """The package as uploaded; a single-file function as a zip of that one file."""
    code = p.registry.code(fn)
    if code.kind == "zip":
        return code.data
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(p.registry.runtime(fn).code_filename(fn.handler), code.data)
    return buf.getvalue()
