"""Asynchronous image jobs: submitted over HTTP, run by a task consumer on Ray Serve's
asynchronous inference, their end told by webhooks."""
