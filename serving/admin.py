"""Who may change what the server serves: the repository load/unload routes, and keeping server paths out of answers.

With an admin token (env TUNELINE_SERVE_ADMIN_TOKEN) those routes need it as the bearer token (the serving
token does not open them). Without one they answer only loopback clients: the pipeline's post-promotion
notification from the same machine works, anyone else who can reach the port gets 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from pathlib import Path

from tuneline.serving.errors import Forbidden, ServingError, Unauthorized

ADMIN_ROUTE = re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$")
REGISTRY_PLACEHOLDER = "<registry>"


def is_admin_route(method: str, path: str) -> bool:
    return method == "POST" and ADMIN_ROUTE.match(path) is not None


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or ::ffff:127.x; None (a Unix socket) counts as local."""
    if host is None:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def admin_refusal(client_host: str | None, authorization: bytes, admin_token: bytes | None) -> ServingError | None:
    """Why an admin request is refused, or None."""
    if admin_token is not None:
        if not authorization.startswith(b"Bearer ") or not hmac.compare_digest(authorization[7:].strip(), admin_token):
            return Unauthorized("repository load/unload needs the admin token: send 'Authorization: Bearer "
                                "<admin token>' (the server's TUNELINE_SERVE_ADMIN_TOKEN)")
        return None
    if not is_loopback(client_host):
        return Forbidden("repository load/unload is open to loopback clients only: set TUNELINE_SERVE_ADMIN_TOKEN on "
                         "the server and send it as the bearer token to use it from elsewhere")
    return None


class PathRedactor:
    """Replaces the registry's absolute path in client-facing text with '<registry>' (logs keep the full path)."""

    def __init__(self, registry: Path):
        forms = {str(registry), str(Path(registry).resolve())}
        self._forms = sorted((f for f in forms if len(f) > 1), key=len, reverse=True)  # longest first

    def text(self, message: str) -> str:
        for form in self._forms:
            message = message.replace(form, REGISTRY_PLACEHOLDER)
        return message

    def body(self, data: bytes) -> bytes:
        for form in self._forms:
            data = data.replace(form.encode(), REGISTRY_PLACEHOLDER.encode())
        return data
