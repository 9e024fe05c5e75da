"""The `hub` command. Every failure is one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import typer

from hub import basemodel

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Adapter Hub: registry and runtime for PEFT adapters.")
base_app = typer.Typer(no_args_is_help=True, help="The base models the hub serves adapters on.")
app.add_typer(base_app, name="base")


def fail(message: str, code: int = 1) -> None:
    """Print one clear line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@base_app.command("prepare")
def base_prepare(name: str = typer.Argument(basemodel.DEFAULT_BASE_MODEL)) -> None:
    """Convert an embedded base model into a cached HF folder (once) and print its path."""
    if name not in basemodel.EMBEDDED:
        fail(f"unknown embedded base model {name!r}; known: {', '.join(basemodel.EMBEDDED)}")
    try:
        typer.echo(basemodel.prepare_embedded(name))
    except basemodel.BaseModelError as e:
        fail(str(e))


@base_app.command("generate")
def base_generate(
    prompt: str,
    base_model: str = typer.Option(basemodel.DEFAULT_BASE_MODEL, "--base-model"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
) -> None:
    """Greedy chat reply from the base model alone, in-process (no server, no adapters)."""
    try:
        model, tokenizer = basemodel.load(base_model)
    except basemodel.BaseModelError as e:
        fail(str(e))
    typer.echo(basemodel.chat_reply(model, tokenizer, prompt, max_new_tokens=max_new_tokens))

