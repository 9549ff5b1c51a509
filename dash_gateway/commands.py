"""``dash-gateway users add|list|remove`` and ``dash-gateway invite``: the registry from a shell."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, NoReturn

from jupyter_core.application import JupyterApp, base_aliases, base_flags
from traitlets import Bool, Float, Unicode
from traitlets.config import Application
from traitlets.config.loader import ConfigFileNotFound

from dash_gateway.app import DashGateway
from dash_gateway.registry import OPERATOR, Registry, RegistryError, iso

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8888/"


class RegistryCommand(JupyterApp):
    """A command on the gateway's registry; reads the gateway's configuration files, so
    ``c.DashGateway.data_dir`` applies, and takes ``--data-dir``."""

    command = ""
    usage = ""
    # Same files as the gateway: jupyter_server_config.* holds c.DashGateway settings.
    config_file_name = Unicode("jupyter_server_config", config=True)
    aliases = {**base_aliases, "data-dir": "DashGateway.data_dir"}
    flags = dict(base_flags)
    # --help describes each alias from its trait: DashGateway's traits must be known here.
    classes = [DashGateway]
    _gateway: Any = None

    def load_config_file(self, suppress_errors: bool = True) -> None:  # type: ignore[override]
        super().load_config_file(suppress_errors)
        # The extension's own file, as the gateway reads it too.
        with contextlib.suppress(ConfigFileNotFound):
            Application.load_config_file(
                self, "jupyter_dash_gateway_config", path=self.config_file_paths
            )

    def gateway_setting(self, name: str) -> Any:
        """A ``DashGateway`` trait as the gateway would see it (config files, command line)."""
        if self._gateway is None:
            self._gateway = DashGateway(config=self.config)
        return getattr(self._gateway, name)

    def registry(self) -> Registry:
        try:
            return Registry(self.gateway_setting("data_dir"))
        except RegistryError as exc:
            self.fail(str(exc))
        except OSError as exc:
            self.fail(f"cannot open the registry in {self.gateway_setting('data_dir')}: {exc}")

    def fail(self, message: str) -> NoReturn:
        print(f"{self.command}: {message}", file=sys.stderr)
        self.exit(1)
        raise AssertionError("unreachable")  # pragma: no cover

    def arguments(self, names: list[str]) -> list[str]:
        """The positional arguments, exactly ``names`` of them, or a usage error."""
        if len(self.extra_args) != len(names):
            self.fail(f"expected {' '.join(names) or 'no arguments'}; usage: {self.usage}")
        return list(self.extra_args)


class UsersAddApp(RegistryCommand):
    name = "dash-gateway-users-add"
    command = "dash-gateway users add"
    usage = "dash-gateway users add NAME [--data-dir=PATH]"
    description = "Create an account and print its API token (shown only this once)."

    def start(self) -> None:
        (name,) = self.arguments(["NAME"])
        try:
            user, token = self.registry().add_user(name)
        except RegistryError as exc:
            self.fail(str(exc))
        print(f"Created user {user.name}. Their API token is shown only this once:")
        print()
        print(f"    {token}")
        print()
        print(
            "Only its hash is stored, so it cannot be shown again; if it is lost, remove the "
            "user and add them again. The token works as DASH_TOKEN, in an 'Authorization: "
            "token ...' header, and on the gateway's login page; it reaches the DASH API only "
            "(no kernels or terminals on the gateway machine)."
        )


class UsersListApp(RegistryCommand):
    name = "dash-gateway-users-list"
    command = "dash-gateway users list"
    usage = "dash-gateway users list [--data-dir=PATH]"
    description = "List the accounts and how many machines each contributes."

    def start(self) -> None:
        self.arguments([])
        registry = self.registry()
        users = registry.list_users()
        if not users:
            print("No users yet; create one with: dash-gateway users add NAME")
            return
        machines: dict[str, int] = {}
        for machine in registry.machines():
            machines[machine.owner] = machines.get(machine.owner, 0) + 1
        width = max(len("NAME"), *(len(u.name) for u in users))
        print(f"{'NAME':<{width}}  {'CREATED':<20}  MACHINES")
        for user in users:
            print(f"{user.name:<{width}}  {iso(user.created):<20}  {machines.get(user.name, 0)}")


class UsersRemoveApp(RegistryCommand):
    name = "dash-gateway-users-remove"
    command = "dash-gateway users remove"
    usage = "dash-gateway users remove NAME [--data-dir=PATH]"
    description = "Remove an account: its token stops working at once, its unused invites too."

    def start(self) -> None:
        (name,) = self.arguments(["NAME"])
        try:
            owned = self.registry().remove_user(name)
        except RegistryError as exc:
            self.fail(str(exc))
        print(f"Removed user {name}: their token and unused invites no longer work.")
        if owned:
            print(
                f"Their {owned} machine(s) stay in the pool under their name; the operator can "
                "revoke them (DELETE /dash/api/workers/<machine>)."
            )


class UsersApp(Application):
    name = "dash-gateway-users"
    description = "Manage DASH user accounts and their API tokens."
    aliases = {"data-dir": "DashGateway.data_dir"}
    classes = [DashGateway]
    subcommands = {
        "add": (UsersAddApp, UsersAddApp.description),
        "list": (UsersListApp, UsersListApp.description),
        "remove": (UsersRemoveApp, UsersRemoveApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            print(
                "dash-gateway users: give a subcommand: add NAME, list or remove NAME",
                file=sys.stderr,
            )
            self.exit(1)
        self.subapp.start()


class InviteApp(RegistryCommand):
    name = "dash-gateway-invite"
    command = "dash-gateway invite"
    usage = "dash-gateway invite [--expires SECONDS] [--owner NAME] [--url URL] [--json]"
    description = (
        "Create a one-time invite to contribute a machine and print the command to run on it."
    )

    expires = Float(
        None,
        allow_none=True,
        help="Seconds the invite stays valid (default: DashGateway.invite_lifetime, 1 day).",
    ).tag(config=True)
    owner = Unicode(OPERATOR, help="The user who will own the machine.").tag(config=True)
    url = Unicode(
        "",
        help="The gateway URL the machine joins (default: DashGateway.public_url, else the "
        "URL the running gateway recorded, else http://127.0.0.1:8888/).",
    ).tag(config=True)
    json = Bool(False, help="Print the invite as JSON, as POST /dash/api/invites does.").tag(
        config=True
    )

    aliases = {
        **RegistryCommand.aliases,
        "expires": "InviteApp.expires",
        "owner": "InviteApp.owner",
        "url": "InviteApp.url",
    }
    flags = {
        **RegistryCommand.flags,
        "json": ({"InviteApp": {"json": True}}, "Print the invite as JSON."),
    }

    def start(self) -> None:
        from dash_gateway.machines import invite_reply

        self.arguments([])
        lifetime = (
            self.expires if self.expires is not None else self.gateway_setting("invite_lifetime")
        )
        registry = self.registry()
        url = (
            self.url
            or self.gateway_setting("public_url")
            or registry.get_meta("gateway_url")
            or DEFAULT_GATEWAY_URL
        )
        if not url.endswith("/"):
            url += "/"
        try:
            token, invite = registry.create_invite(self.owner, lifetime)
        except RegistryError as exc:
            self.fail(str(exc))
        reply = invite_reply(token, invite, url)
        if self.json:
            print(json.dumps(reply, indent=2))
            return
        print(f"gateway: {reply['gateway']}")
        print(f"owner:   {reply['owner']}")
        print(f"expires: {reply['expires']}")
        print(f"token:   {reply['token']}")
        print()
        print("The invite works once. On the machine to contribute, run:")
        print()
        print(f"    {reply['command']}")
