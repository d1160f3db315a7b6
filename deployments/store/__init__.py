"""The image store deployment: uploads and results held between calls, by id, with quotas
and expiry. No torch; the app binds it, the service calls it (``serve_app/service/store.py``)."""
