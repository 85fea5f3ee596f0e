"""The browser pages: the playground at `/` and offline API docs at `/docs` (Swagger UI) and `/redoc`.

Every asset comes from this app (the playground's from `server/playground_static/`, the docs' from the
`fastapi-offline` package), so the pages work on a machine that reaches no other host. The
OpenAPI schema they read states this deployment's pixel cap, which `api/` cannot know.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from settings import Settings

PLAYGROUND_DIR = Path(__file__).parent / "playground_static"
DOCS_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))  # Swagger UI and ReDoc bundles, no CDN
STATIC_PREFIX = "/static/"
# Pages a browser opens before it has a key: they hold no request data.
PUBLIC_PATHS = frozenset({"/", "/docs", "/redoc", "/openapi.json", "/playground/config"})
# Relative URLs: the pages keep working under a proxy's path prefix.
DOCS_CSS, DOCS_JS, REDOC_JS, FAVICON = (
    "static/docs/swagger-ui.css", "static/docs/swagger-ui-bundle.js", "static/docs/redoc.standalone.js",
    "static/docs/favicon.png",
)
# What the bundles would fetch on their own (ReDoc's sidebar shows a logo from its CDN): this host only.
DOCS_POLICY = {"Content-Security-Policy": "img-src 'self' data:; font-src 'self' data:; connect-src 'self'"}


def is_public_page(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(STATIC_PREFIX)


def mount_pages(app: FastAPI, settings: Settings) -> None:
    """Add the playground, the docs and their assets to `app` (built with docs_url=None, redoc_url=None)."""
    app.mount(f"{STATIC_PREFIX}playground", StaticFiles(directory=PLAYGROUND_DIR), name="playground-assets")
    app.mount(f"{STATIC_PREFIX}docs", StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND_DIR / "index.html")

    @app.get("/playground/config", include_in_schema=False)
    async def playground_config() -> dict[str, Any]:
        return {"api_key_required": bool(settings.api_keys), "max_pixels": settings.max_pixels,
                "tiny_preset": settings.model_dir is None}

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return _with_policy(get_swagger_ui_html(
            openapi_url="openapi.json", title=f"{app.title} - Swagger UI", swagger_js_url=DOCS_JS,
            swagger_css_url=DOCS_CSS, swagger_favicon_url=FAVICON, oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None},  # its default badge calls an outside validator
        ))

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return _with_policy(get_redoc_html(openapi_url="openapi.json", title=f"{app.title} - ReDoc",
                                           redoc_js_url=REDOC_JS, redoc_favicon_url=FAVICON, with_google_fonts=False))

    generate = app.openapi

    def openapi_with_pixel_cap() -> dict[str, Any]:
        if app.openapi_schema is None:
            describe_pixel_cap(generate(), settings.max_pixels)
        return app.openapi_schema

    app.openapi = openapi_with_pixel_cap  # type: ignore[method-assign]


def _with_policy(page: HTMLResponse) -> HTMLResponse:
    page.headers.update(DOCS_POLICY)
    return page


def describe_pixel_cap(schema: dict[str, Any], max_pixels: int) -> None:
    """Append the deployment's cap (`SRPO_MAX_PIXELS`) to the size fields' descriptions, in place."""
    cap = f"At most {max_pixels} pixels (width*height) per image on this deployment (SRPO_MAX_PIXELS)."
    shapes = schema["components"]["schemas"]
    fields = [shapes["ImageSize"]["properties"]["width"], shapes["ImageSize"]["properties"]["height"],
              shapes["TextToImageInput"]["properties"]["image_size"]]
    for field in fields:
        field["description"] = f"{field.get('description', '')} {cap}".strip()
    source = shapes["ImageToImageInput"]["properties"]["image_url"]
    source["description"] += f" Larger sources are scaled down to {max_pixels} pixels."
