"""The fronts: one module per wire protocol, each a thin adapter over the images service.

A front converts its wire shapes into the one :class:`~serve_app.service.request.ImageRequest`
(``to_request()``), hands it to :class:`~serve_app.service.images.ImagesService`, and maps
the answer and any :class:`~serve_app.service.errors.APIError` back to its own shapes. No
front holds logic another front would need: that belongs to the service.

- ``openai.py``: OpenAI's Images API routes, request bodies and forms
- ``livepeer.py``: Livepeer's runner routes (its client, ``livepeer-ai``)
- ``stability.py``: Stability AI's gRPC ``GenerationService`` on Ray Serve's gRPC proxy, from
  the protocol in ``gooseai/`` (generated code)
- ``jobs.py``: the asynchronous jobs API (submit, poll, cancel), run by the task consumer
- ``ingress.py``: the ingress deployment, one FastAPI app with every HTTP front's router and
  the gRPC method; ``static/``: the playground page it serves
- ``routing.py``, ``openapi.py``: what the HTTP routes share, what the OpenAPI document says
- ``http.py``, ``gate.py``, ``metrics.py``: error handlers, API keys and body limits, metrics

A new front is a module here beside these, calling the same service (docs/architecture.md,
"Adding a front").
"""
