"""The `hub` command's click plumbing, in one place for every subcommand: a usage error (bad value,
unknown option, extra argument) is one `error: ...` line and exit 2 instead of Typer's boxed panel, an
unexpected exception one `error: unexpected ...` line and exit 1 (the traceback with HUB_DEBUG=1),
and help renders flags as flags and argument placeholders in capitals."""
from __future__ import annotations

import functools
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer._coercion import RuntimeParam, TypeDescriptor, build_runtime_param
from typer._param_types import coerce_cli_path
from typer.core import TyperArgument, TyperGroup, TyperOption

PROG_NAME = "hub"
DEBUG_VAR = "HUB_DEBUG"  # set (not 0): an unexpected exception shows its traceback
REF_ARG = typer.Argument(..., help="name, name@1.2.0 or name@tag.")


def one_line(text: str) -> str:
    """Messages from click or the server can span lines; the CLI's errors never do."""
    return " ".join(text.split())


def polish_help(command: Any) -> None:
    """Every argument's placeholder is its name in capitals (`PATH`, `REF`, `TAG`) and a flag shows no
    `<bool>` value, on this command and all its subcommands; and each parameter's value is converted by
    `PlainValues`."""
    params = [*command.params, command.get_help_option(typer.Context(command))]  # --help is made lazily
    for param in params:
        if isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()
        elif isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
        if isinstance(param, (TyperArgument, TyperOption)) and param._runtime_param is None:
            param._runtime_param = PlainValues(param.type_descriptor.parameter_info,
                                               param.type_descriptor.annotation, param.type_descriptor)
    for sub in getattr(command, "commands", {}).values():
        polish_help(sub)


_PLAIN_INT = re.compile(r"-?(0|[1-9][0-9]*)")


@functools.cache
def _typer_coercion(descriptor: TypeDescriptor) -> RuntimeParam:
    return build_runtime_param(descriptor)


@dataclass(frozen=True)
class PlainValues(RuntimeParam):
    """Typer's conversion of one parameter's value, with the plain cases done here: a text, a path, a list
    of texts, a whole number written plainly within the parameter's bounds, and a value not given. Typer
    builds a pydantic TypeAdapter for every parameter it converts (the help option's absent value too), and
    importing pydantic was a third of a registry command's start; every other value (and each error
    message) is left to Typer's own conversion."""

    descriptor: TypeDescriptor

    def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
        info, annotation = self.parameter_info, self.annotation
        if info.parser is None and isinstance(value, str):
            if annotation is str:
                return value
            if annotation is Path and info.path_type in (None, Path):  # its checks (exists, ...) run as Typer's
                return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
            if annotation is int and _PLAIN_INT.fullmatch(value):
                number = int(value)
                if (info.min is None or number >= info.min) and (info.max is None or number <= info.max):
                    return number
        if info.parser is None and annotation == list[str] and all(isinstance(v, str) for v in value):
            return list(value)
        return _typer_coercion(self.descriptor)._coerce_value(value, param=param, ctx=ctx)


class HubGroup(TyperGroup):
    """The top-level `hub` group: click's own exceptions end as one `error:` line and their exit code."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError  # Typer vendors click

        polish_help(self)
        try:
            # named `hub` however it was started (python -m hub, a test runner): help, errors, completion
            rv = super().main(args, PROG_NAME, complete_var, standalone_mode=False,
                              windows_expand_args=windows_expand_args, **extra)
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


def fail(message: str, code: int = 1) -> NoReturn:
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
