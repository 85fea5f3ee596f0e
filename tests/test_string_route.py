"""StringParamsRoute (the queue's per-request routes): the same OpenAPI schema and the same answers
as FastAPI's own route for the same endpoint, and no endpoint whose parameters need validating."""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from server.string_route import StringParamsRoute


async def echo(request_id: str, request: Request, logs: str | None = None,
               fmt: str | None = Query(None, alias="format", description="an aliased parameter")) -> JSONResponse:
    if request_id == "missing":
        raise HTTPException(404, f"Request {request_id} not found")
    return JSONResponse({"request_id": request_id, "logs": logs, "format": fmt, "host": request.headers["host"]},
                        status_code=202)


def _app(route_class: type[APIRoute]) -> FastAPI:
    app = FastAPI()
    app.router.add_api_route("/requests/{request_id}/status", echo, methods=["GET"], summary="A status",
                             route_class_override=route_class)
    return app


def test_same_schema_and_answers_as_fastapis_own_route():
    plain, lean = _app(APIRoute), _app(StringParamsRoute)
    assert lean.openapi() == plain.openapi()
    asks = ["/requests/abc/status", "/requests/abc/status?logs=1", "/requests/abc/status?logs=",
            "/requests/abc/status?logs=1&logs=0", "/requests/a%20b/status?format=x&other=1",
            "/requests/missing/status", "/requests/abc/status/extra"]
    seen = set()
    for ask in asks:
        answers = [TestClient(app).get(ask) for app in (plain, lean)]
        assert (answers[0].status_code, answers[0].json()) == (answers[1].status_code, answers[1].json()), ask
        seen.add(answers[1].status_code)
    assert seen == {202, 404}  # answered by the endpoint, by its HTTPException and by the router


@pytest.mark.parametrize("signature", ["int_path", "required_query", "header", "dependency", "constrained"])
def test_a_parameter_that_needs_validating_is_refused(signature):
    async def int_path(request_id: int) -> None: ...

    async def required_query(request_id: str, logs: str) -> None: ...

    async def header(request_id: str, x_token: str | None = Header(None)) -> None: ...

    async def dependency(request_id: str, value: str = Depends(lambda: "x")) -> None: ...

    async def constrained(request_id: str = Path(max_length=3)) -> None: ...

    endpoint = locals()[signature]
    with pytest.raises(TypeError, match="StringParamsRoute takes only"):
        FastAPI().router.add_api_route("/r/{request_id}", endpoint, route_class_override=StringParamsRoute)
