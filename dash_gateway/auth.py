"""Who is asking: the server token is the operator, an account token (``dash-gateway users add``) its account."""

from __future__ import annotations

import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.authorizer import Authorizer
from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider, User
from tornado import web

from dash_gateway.registry import OPERATOR

if TYPE_CHECKING:
    from dash_gateway.registry import Registry

log = logging.getLogger(__name__)

# The one Jupyter resource an account may use: the DASH API. Kernels, terminals, contents
# and the rest run code or read files as the operator.
ACCOUNT_RESOURCES = frozenset({"dash"})


def operator_user() -> User:
    return User(username=OPERATOR, name="Operator", display_name="Operator", initials="OP")


def account_user(name: str) -> User:
    return User(username=name)


class DashIdentityProvider(PasswordIdentityProvider):
    """Jupyter's token/password identity provider, plus DASH accounts.

    Whoever presents the server's token (or password) is the user ``operator``; an account
    token from the registry is that account, in the ``Authorization: token …`` header, the
    ``?token=`` URL parameter or the login form. Login cookies name the user and are honoured
    only while the account still exists.
    """

    # Set by the DASH extension once it has opened the registry; None: no accounts.
    registry: Registry | None = None

    async def get_user_token(self, handler: web.RequestHandler) -> User | None:
        token = self.get_token(handler)
        if not token:
            return None
        if self.token and hmac.compare_digest(token.encode(), self.token.encode()):
            return operator_user()
        name = self.registry.user_for_token(token) if self.registry is not None else None
        if name is not None:
            log.debug("Accepting the account token of %s", name)
            return account_user(name)
        return None

    def generate_anonymous_user(self, handler: web.RequestHandler) -> User:
        # Upstream calls this whenever the server's own credentials (token, password) were
        # presented, or when authentication is disabled: in DASH that person is the operator.
        return operator_user()

    def process_login_form(self, handler: web.RequestHandler) -> User | None:
        user = super().process_login_form(handler)
        if user is None and self.registry is not None:
            name = self.registry.user_for_token(handler.get_argument("password", default=""))
            if name is not None:
                user = account_user(name)
        return user

    def user_to_cookie(self, user: User) -> str:
        data = json.loads(super().user_to_cookie(user))
        if user.username != OPERATOR and self.registry is not None:
            account = self.registry.get_user(user.username)
            # Ties the cookie to this account: a removed and re-added namesake is not it.
            data["dash_account_created"] = iso_micro(account.created) if account else None
        return json.dumps(data)

    def user_from_cookie(self, cookie_value: str) -> User | None:
        data: dict[str, Any] = json.loads(cookie_value)
        username = data.get("username")
        if username == OPERATOR:
            return operator_user()
        if self.registry is None or not isinstance(username, str):
            return None
        account = self.registry.get_user(username)
        if account is None or data.get("dash_account_created") != iso_micro(account.created):
            return None
        return account_user(username)


def iso_micro(moment: Any) -> str | None:
    """A creation time to the microsecond (``iso`` keeps only seconds)."""
    return None if moment is None else moment.isoformat(timespec="microseconds")


def is_operator(handler_or_user: Any, identity_provider: IdentityProvider | None = None) -> bool:
    """Is this request's user (or this user) the operator?

    Under another identity provider (e.g. a plain ``jupyter lab`` with the extension
    enabled), whoever passed the server's authentication is the operator. Given only a
    ``User`` and no provider, only the user named ``operator`` is.
    """
    if isinstance(handler_or_user, User):
        user: User | None = handler_or_user
        provider = identity_provider
        if provider is None:
            return handler_or_user.username == OPERATOR
    else:
        user = handler_or_user.current_user
        provider = identity_provider or handler_or_user.identity_provider
    if not user:
        return False
    if not isinstance(provider, DashIdentityProvider):
        return True
    return getattr(user, "username", None) == OPERATOR


def username(handler: Any) -> str:
    """The DASH owner name for this request's user: ``operator`` or the account's name."""
    if is_operator(handler):
        return OPERATOR
    return str(handler.current_user.username)


class DashAuthorizer(Authorizer):
    """The operator may do everything; an account only use the ``dash`` resource."""

    def is_authorized(
        self, handler: web.RequestHandler, user: User, action: str, resource: str
    ) -> bool:
        if is_operator(user, self.identity_provider):
            return True
        allowed = resource in ACCOUNT_RESOURCES
        if not allowed:
            log.debug("Refused %s on %s to account %s", action, resource, user.username)
        return allowed
