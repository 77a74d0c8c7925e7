"""`/docs`: interactive API documentation (Swagger UI from the `swagger-ui-bundle-v2`
package, served from the package's files: no CDN) of `/api/v1/openapi.json`, which
includes the seed surface and the bearer scheme ("Authorize" takes a token)."""

from __future__ import annotations

from aiohttp import web

SECURITY_HEADERS = {
    # Swagger UI sets inline styles; scripts come only from here (no inline script)
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>Safehold API</title>
<link rel="stylesheet" type="text/css" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js" charset="UTF-8"></script>
<script src="/docs/safehold-docs.js" charset="UTF-8"></script>
</body>
</html>
"""
_INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/api/v1/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
  });
};
"""
_FILES = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript",
          "favicon-32x32.png": "image/png", "favicon-16x16.png": "image/png"}


def _dist() -> object:
    from swagger_ui_bundle import swagger_ui_path

    return swagger_ui_path


async def docs_index(request: web.Request) -> web.Response:
    return web.Response(text=_INDEX, content_type="text/html", headers=SECURITY_HEADERS)


async def docs_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if name == "safehold-docs.js":
        return web.Response(text=_INIT, content_type="text/javascript",
                            headers=SECURITY_HEADERS)
    if name not in _FILES:
        raise web.HTTPNotFound()
    data = (_dist() / name).read_bytes()  # type: ignore[operator]
    return web.Response(body=data, content_type=_FILES[name],
                        headers={**SECURITY_HEADERS, "Cache-Control": "public, max-age=86400"})
