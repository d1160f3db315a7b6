"""Typed errors raised by the model deployments.

Deployments know nothing about HTTP; the ingress maps these to status codes.
"""

from __future__ import annotations


class InvalidJobError(ValueError):
    """A job a pipeline cannot run as asked; ``param`` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):
        # Keep ``param`` when the error crosses a process boundary.
        return (type(self), (self.message, self.param))


class UpstreamLost(RuntimeError):
    """The replica that made this stage's input failed (its node was lost) before handing
    it over: the request fails at once, as a lost replica does (503)."""

    def __init__(self, reason: str = ""):
        super().__init__(f"a previous stage's replica failed ({reason})" if reason else
                         "a previous stage's replica failed")
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.reason,))


class ServerFaultError(RuntimeError):
    """A job failed for the server's reasons, not the request's: its libraries clash, a
    file its config names is missing on the server, the Hub cannot be reached. The images
    service answers it as a :class:`~serve_app.protocol.errors.ServerFaultAPIError`, a 500
    ``server_error`` with ``message`` (a line, no traceback) and ``code``."""

    def __init__(self, message: str, code: str = "server_fault"):
        super().__init__(message)
        self.message = message
        self.code = code

    def __reduce__(self):
        return (type(self), (self.message, self.code))
