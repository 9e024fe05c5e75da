"""The `hub` command's click plumbing, in one place for every subcommand: a usage error (bad value,
unknown option, extra argument) is one `error: ...` line and exit 2 instead of Typer's boxed panel, an
unexpected exception one `error: unexpected ...` line and exit 1 (the traceback with HUB_DEBUG=1),
and help renders flags as flags and argument placeholders in capitals."""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperArgument, TyperGroup, TyperOption

PROG_NAME = "hub"
DEBUG_VAR = "HUB_DEBUG"  # set (not 0): an unexpected exception shows its traceback
REF_ARG = typer.Argument(..., help="name, name@1.2.0 or name@tag.")


def one_line(text: str) -> str:
    """Messages from click or the server can span lines; the CLI's errors never do."""
    return " ".join(text.split())


def polish_help(command: Any) -> None:
    """Every argument's placeholder is its name in capitals (`PATH`, `REF`, `TAG`) and a flag shows no
    `<bool>` value, on this command and all its subcommands."""
    params = [*command.params, command.get_help_option(typer.Context(command))]  # --help is made lazily
    for param in params:
        if isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()
        elif isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        polish_help(sub)


class HubGroup(TyperGroup):
    """The top-level `hub` group: click's own exceptions end as one `error:` line and their exit code."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError  # Typer vendors click

        polish_help(self)
        try:
            # named `hub` however it was started (python -m hub, a test runner): help, errors, completion
            rv = super().main(args, PROG_NAME, complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except NoArgsIsHelpError as e:  # the help was printed already: no error line to add
            code = e.exit_code
        except ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None and e.exit_code == 2 else ""
            typer.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
            code = e.exit_code
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            code = 1
        except Exception as e:  # a bug, or a case no command foresaw: one line; the traceback on request
            if os.environ.get(DEBUG_VAR, "0") not in ("", "0"):
                raise
            typer.echo(f"error: unexpected {type(e).__name__}: {one_line(str(e))} "
                       f"(rerun with {DEBUG_VAR}=1 for the traceback)", err=True)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


def finite(value: float | None) -> float | None:
    """Option callback: refuse inf and nan, which no sampling or merge parameter can mean."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def fail(message: str, code: int = 1) -> None:
    """Print one clear line and exit non-zero."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def printable(text: str) -> str:
    """Text from a manifest (which may come from anyone's remote) with control and format characters escaped
    (`\\x1b`, `\\u202e`), so no escape sequence in a description or base model id reaches the terminal."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def table(rows: list[list[str]]) -> str:
    """Rows as left-aligned columns two spaces apart (cells made printable)."""
    cells = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)
