"""Prometheus metrics of the ingress, exported through Ray's metrics agent."""

from __future__ import annotations

from ray.serve import metrics

from serve_app.fronts.gate import route_path


class IngressMetrics:
    """Requests by route, model and status, and images returned by model."""

    def __init__(self):
        self.requests = metrics.Counter(
            "serve_app_requests", "Requests answered, by route, model and HTTP status.",
            ("route", "model", "status"),
        )
        self.images = metrics.Counter("serve_app_images", "Images returned, by model.", ("model",))

    def on_response(self, route: str, model: str, status: int, images: int = 0) -> None:
        self.requests.inc(1, {"route": route, "model": model, "status": str(status)})
        if images:
            self.images.inc(images, {"model": model})


KNOWN_ROUTES = frozenset({
    "/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/images/upscale",
    "/v1/models", "/text-to-image", "/image-to-image", "/upscale", "/health",
})


class MetricsMiddleware:
    """Counts every answered request by route, model and status (400s from validation,
    401s and 413s from the gate included). Routes record the model they resolved, and the
    images they returned, in ``request.state``."""

    def __init__(self, app):
        self.app = app
        self._metrics: IngressMetrics | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self._record(scope, status)

    def _record(self, scope, status: int) -> None:
        import ray

        if not ray.is_initialized():
            return
        if self._metrics is None:
            self._metrics = IngressMetrics()
        path = route_path(scope)
        route = path if path in KNOWN_ROUTES else ("/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        state = scope.get("state") or {}
        self._metrics.on_response(route, state.get("model", "-"), status, state.get("images", 0))
