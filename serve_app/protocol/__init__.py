"""The protocol: what every other part of the app speaks, importing none of them.

``request.py`` (:class:`ImageRequest`, the one normalized request every front converts into,
and the table of wire bounds), ``sizes.py`` (every size rule), ``responses.py`` (what the
service answers, OpenAI's shapes, and the error envelope) and ``errors.py`` (the API errors
and the mapping of any exception to one). The config, the images service, the fronts and the
jobs import it; it imports only the deployments' contract.
"""
