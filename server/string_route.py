"""A FastAPI route for endpoints whose parameters are all plain strings: documented like any route
(the OpenAPI schema comes from the endpoint's signature), called without FastAPI's per-request
parameter solving.

Issue 25: fal clients poll a waiting request's status ten times a second each, and FastAPI's
dependency solving for the status route's `request_id` and `logs` cost more than the rest of the
read. For a `str` path parameter, an optional `str | None = None` query parameter and the
`Request`, that solving can never fail or convert anything, so the handler passes the strings on
as they are (the last value of a repeated query parameter, as FastAPI does). Any other kind of
parameter is refused when the route is built, so a later signature change cannot silently skip
a validation.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class StringParamsRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        dependant = self.dependant
        plain = (not (dependant.header_params or dependant.cookie_params or dependant.body_params
                      or dependant.dependencies or dependant.response_param_name
                      or dependant.background_tasks_param_name)
                 and all(p.field_info.annotation is str and not p.field_info.metadata for p in dependant.path_params)
                 and all(p.field_info.annotation == str | None and p.field_info.default is None
                         and not p.field_info.metadata for p in dependant.query_params))
        if not plain:
            raise TypeError(f"{self.path}: StringParamsRoute takes only str path parameters, "
                            "`str | None = None` query parameters and the Request")
        call = dependant.call
        queries = [(p.name, p.alias) for p in dependant.query_params]
        request_name = dependant.request_param_name

        async def handler(request: Request) -> Response:
            query = request.query_params
            arguments: dict[str, Any] = {**request.path_params, **{name: query.get(alias) for name, alias in queries}}
            if request_name:
                arguments[request_name] = request
            return await call(**arguments)

        return handler
