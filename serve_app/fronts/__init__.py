"""The fronts: one module per wire protocol, each a thin adapter over the images service.

A front converts its wire shapes into the one :class:`~serve_app.protocol.request.ImageRequest`
(``to_request()``), hands it to :class:`~serve_app.service.images.ImagesService`, and maps
the answer and any :class:`~serve_app.protocol.errors.APIError` back to its own shapes. No
front holds logic another front would need: that belongs to the service.

- ``openai.py``: OpenAI's Images API routes (their bodies are in ``wire.py``)
- ``livepeer.py``: Livepeer's runner routes (its client, ``livepeer-ai``)
- ``stability.py``: Stability AI's gRPC ``GenerationService`` on Ray Serve's gRPC proxy, from
  the protocol in ``gooseai/`` (generated code)
- ``jobs.py``: the asynchronous jobs API (submit, poll, cancel), run by the task consumer
- ``ingress.py``: the app factory (every HTTP front's router on one FastAPI app) and the
  ingress deployment, which puts what the routes need on its app's state
- ``wire.py``: the request bodies more than one front takes (OpenAI's and the jobs routes')
- ``shared.py``, ``openapi.py``: what the HTTP routes share, what the OpenAPI document says
- ``error_handlers.py``, ``gate.py``, ``metrics.py``: error handlers, API keys and body limits, metrics

A new front is a module here beside these, calling the same service (docs/architecture.md,
"Adding a front").
"""
