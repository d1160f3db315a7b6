"""The fronts: one module per wire protocol, each a thin adapter over the images service.

A front converts its wire shapes into the one :class:`~serve_app.protocol.request.ImageRequest`
(``to_request()``), hands it to :class:`~serve_app.service.images.ImagesService`, and maps
the answer and any :class:`~serve_app.protocol.errors.APIError` back to its own shapes. No
front holds logic another front would need: that belongs to the service.

- ``openai.py``: OpenAI's Images API routes, request bodies and forms
- ``livepeer.py``: Livepeer's runner routes (its client, ``livepeer-ai``)
- ``ingress.py``: the app factory (every HTTP front's router on one FastAPI app) and the
  ingress deployment, which puts what the routes need on its app's state
- ``shared.py``, ``openapi.py``: what the HTTP routes share, what the OpenAPI document says
- ``error_handlers.py``, ``gate.py``, ``metrics.py``: error handlers, API keys and body limits, metrics

A new front (Stability's gRPC ``GenerationService`` on Ray Serve's gRPC proxy, the async
jobs API) is a module here beside these, calling the same service.
"""
