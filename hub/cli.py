"""The `hub` command: one entry that mounts the registry, merge, train, eval and runtime command groups.

Every failure is one clear line on stderr and a non-zero exit (`hub.clikit.fail`). The registry package itself
never imports the runtime; only this entry module knows both.
"""
from __future__ import annotations

import typer

from hub import merge_cli, registry_cli, train_cli
from hub.clikit import HubGroup
from runtime import cli as runtime_cli
from runtime import eval_cli

app = typer.Typer(cls=HubGroup, no_args_is_help=True, help="Adapter Hub: registry and runtime for PEFT adapters.")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version as package_version  # imported here: every command start pays it

        typer.echo(f"hub {package_version('adapterhub-serve')}")
        raise typer.Exit()


@app.callback()
def _main(_: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit.")) -> None:
    """Options that apply before any command."""


app.add_typer(registry_cli.app)
merge_cli.register(app)
runtime_cli.register(app)
train_cli.register(app)
eval_cli.register(app)
