"""Bearer tokens for admin (and optionally classification) RPCs, compared in constant time."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Optional

import grpc

from server.errors import PermissionDenied, Unauthenticated
from stadapter_api.wire import ADMIN_TOKEN_ENV


def read_token(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read token file {path}: {e}") from e
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def _bearer(context: grpc.aio.ServicerContext) -> Optional[str]:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return bearer_token(value.decode("latin-1") if isinstance(value, bytes) else value)
    return None


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The token of an ``authorization: Bearer <token>`` value (gRPC metadata or HTTP header); "" for another
    scheme, None when there is no such value."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class Auth:
    def __init__(self, admin_token: Optional[str], allow_insecure_admin: bool = False,
                 classify_token: Optional[str] = None):
        self.admin_token = admin_token
        self.allow_insecure_admin = allow_insecure_admin
        self.classify_token = classify_token

    @classmethod
    def from_config(cls, cfg) -> "Auth":
        admin = read_token(cfg.admin_token_file) or (os.environ.get(ADMIN_TOKEN_ENV) or "").strip() or None
        return cls(admin, cfg.allow_insecure_admin, read_token(cfg.classify_token_file))

    def check_admin(self, context: grpc.aio.ServicerContext) -> None:
        self._check_admin(_bearer(context), "RPCs", "metadata")

    def check_admin_header(self, authorization: Optional[str]) -> None:
        """The HTTP form of :meth:`check_admin` (the ``Authorization`` header's value, None when absent)."""
        self._check_admin(bearer_token(authorization), "requests", "header")

    def _check_admin(self, token: Optional[str], calls: str, carrier: str) -> None:
        if self.admin_token is None:
            if self.allow_insecure_admin:
                return
            raise PermissionDenied(
                f"admin {calls} are disabled: no admin token is configured. Set {ADMIN_TOKEN_ENV} or pass "
                "--admin-token-file on the server (or --allow-insecure-admin for local development), then send "
                f"'authorization: Bearer <token>' {carrier}"
            )
        check_token(token, self.admin_token, "admin", calls, carrier)

    def check_classify(self, context: grpc.aio.ServicerContext) -> None:
        if self.classify_token is not None:
            self._check(context, self.classify_token, "classify")

    def check_classify_header(self, authorization: Optional[str]) -> None:
        """The HTTP form of :meth:`check_classify` (the ``Authorization`` header's value, None when absent)."""
        if self.classify_token is not None:
            check_token(bearer_token(authorization), self.classify_token, "classify", "requests", "header")

    @staticmethod
    def _check(context: grpc.aio.ServicerContext, expected: str, what: str) -> None:
        check_token(_bearer(context), expected, what, "RPCs", "metadata")


def check_token(token: Optional[str], expected: str, what: str, calls: str, carrier: str) -> None:
    if token is None:
        raise Unauthenticated(f"{what} {calls} need 'authorization: Bearer <token>' {carrier}")
    if not _matches(token, expected):
        raise Unauthenticated(f"the {what} bearer token is not valid")
