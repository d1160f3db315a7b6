"""The asynchronous jobs API (``jobs``): its broker, state, consumer deployment and webhooks."""

from __future__ import annotations

import functools
import os

from pydantic import Field, SecretStr, field_validator

from serve_app.config.defaults import WEBHOOK_PORTS
from serve_app.config.base import Strict
from serve_app.config.options import DeploymentOptions, section_default


class WebhooksConfig(Strict):
    """Where job webhooks may go and how they are signed and retried."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts webhooks may be posted to over https: names, or '*.domain'.",
    )
    allowed_http_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts webhooks may be posted to over plain http (a laptop's localhost).",
    )
    allowed_ports: list[int | str] = Field(
        default_factory=functools.partial(list, WEBHOOK_PORTS),
        description="Ports webhooks may be posted to: numbers, or 'low-high' ranges. The list "
        "replaces the default, so keep 80 and 443 in it if they are still wanted.",
    )
    allowed_internal: list[str] = Field(
        default_factory=list,
        description="Loopback, private, link-local, multicast, reserved or unspecified "
        "addresses webhooks may reach anyway: networks ('10.1.0.0/16', '::1') or host names "
        "(any address that name resolves to). Every other such address is refused, checked "
        "on the address the host name resolves to when the webhook is posted.",
    )
    secret: SecretStr | None = Field(
        default=None,
        description="Signing secret, 'whsec_' + base64 (Standard Webhooks); else the "
        "SERVE_APP_WEBHOOK_SECRET environment variable.",
    )
    key_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="A signing secret per API key: the key's SHA-256 (hex, as the job records "
        "keep it) to its secret ('whsec_' + base64; ${VAR} is read from the environment). "
        "The jobs of a key not listed are signed with 'secret'.",
    )
    max_attempts: int = Field(default=5, ge=1, le=20, description="Deliveries tried per job.")
    backoff_s: float = Field(default=2.0, gt=0, description="Wait before the 2nd attempt; doubles.")
    timeout_s: float = Field(
        default=10.0, gt=0,
        description="Seconds one attempt may take in all: resolving, connecting, sending and "
        "reading the answer.",
    )
    max_response_bytes: int = Field(
        default=4096, ge=0,
        description="Bytes of a receiver's answer read at most; the connection is closed then.",
    )

    @field_validator("allowed_ports")
    @classmethod
    def _ports(cls, ports: list[int | str]) -> list[int | str]:
        for port in ports:
            low, _, high = str(port).partition("-")
            try:
                low_n, high_n = int(low), int(high or low)
            except ValueError:
                raise ValueError(f"port {port!r}: expected a number or 'low-high'") from None
            if not 1 <= low_n <= high_n <= 65535:
                raise ValueError(f"port {port!r}: expected 1-65535, low <= high")
        return ports

    @field_validator("allowed_internal")
    @classmethod
    def _internal(cls, entries: list[str]) -> list[str]:
        import ipaddress
        import re

        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\.?", entry):
                    raise ValueError(f"{entry!r}: expected a network (CIDR), an address or a "
                                     "host name") from None
        return entries

    @field_validator("key_secrets")
    @classmethod
    def _key_hashes(cls, secrets: dict[str, SecretStr]) -> dict[str, SecretStr]:
        import re

        for digest in secrets:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{digest[:12]!r}...: expected an API key's SHA-256, 64 lowercase "
                                 "hex digits (printf %s KEY | sha256sum)")
        return secrets


class JobsConfig(Strict):
    """The asynchronous jobs API (``/v1/images/jobs``) and its broker."""

    broker_url: str = Field(
        default="filesystem://",
        description="Celery broker: 'redis://host:6379/0' (${VAR} is read from the "
        "environment), or 'filesystem://' (files under data_folder: no server needed).",
    )
    backend_url: str | None = Field(
        default=None,
        description="Where job state is kept (Celery result backend); default: the Redis "
        "broker itself, or 'file://<data_folder>/state' for the filesystem broker.",
    )
    data_folder: str = Field(
        default="/tmp/serve-app-jobs",
        description="The filesystem broker's and state's folder: created private to the "
        "server's user (0700); refused if another user owns it or others may write to it.",
    )
    queue: str = Field(default="images-jobs", min_length=1, description="Queue name.")
    max_retries: int = Field(default=3, ge=0, le=20,
                             description="Runs after the first when a job fails for the server's reasons.")
    result_ttl_s: float = Field(default=86400, gt=0, description="Seconds a finished job is kept.")
    webhooks: WebhooksConfig = Field(default_factory=WebhooksConfig)
    deployment: DeploymentOptions = Field(
        default_factory=section_default("jobs"),
        description="The consumer deployment; its max_ongoing_requests is how many jobs a "
        "replica runs at once (Serve hands it to Celery as the worker's concurrency). With an "
        "autoscaling_config it scales on the jobs queued and running (serve_app/jobs/autoscaling.py).",
    )
    autoscaling_poll_s: float = Field(
        default=5.0, gt=0, description="How often the consumer's autoscaling policy counts the jobs."
    )

    @property
    def broker(self) -> str:
        """``broker_url`` with ``${VAR}`` taken from the environment (a password from a
        Kubernetes secret)."""
        return os.path.expandvars(self.broker_url)

    @property
    def state_url(self) -> str:
        if self.backend_url:
            return os.path.expandvars(self.backend_url)
        if self.broker_url.startswith("filesystem://"):
            return f"file://{self.data_folder}/state"
        return self.broker
