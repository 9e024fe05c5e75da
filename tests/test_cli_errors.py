"""The `hub` command as a user meets it, run as a real subprocess: every failure is one `error:` line and a
non-zero exit, help renders flags as flags and documents every option, and the small conveniences
(--version, HUB_SERVER, shell completion) work."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer

from hub.cli import app

ERROR_LINE = re.compile(r"error: [^\n]+\n")


def run_hub(*args: str, home: Path, env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    inherited = {k: v for k, v in os.environ.items() if k != "HUB_SERVER"}
    full_env = {**inherited, "HUB_HOME": str(home), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hub", *args], env=full_env, capture_output=True, text=True,
                          input=stdin, timeout=120)


def assert_one_error_line(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert ERROR_LINE.fullmatch(done.stderr), done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


def commands(command=None, path: tuple[str, ...] = ()):
    """(path, click command) for the whole `hub` tree, groups included."""
    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


@pytest.mark.parametrize(("args", "fragments"), [
    (["generate", "Hello", "-a", "name:abc"], ["--adapter", "'name:abc'", "must be a finite number"]),
    (["generate", "Hello", "-a", "name:inf"], ["--adapter", "must be a finite number"]),
    (["list", "me/x"], ["unexpected extra argument", "me/x"]),
    (["generate", "Hello", "--top-k", "-5"], ["--top-k", "greater than or equal to 0"]),
    (["generate", "Hello", "--seed", "-1"], ["--seed", "greater than or equal to 0"]),
    (["generate", "Hello", "--max-new-tokens", "-3"], ["--max-new-tokens", "greater than or equal to 1"]),
    (["generate", "Hello", "--temperature", "inf"], ["--temperature", "not a finite number"]),
    (["generate", "Hello", "--temperature", "nan"], ["--temperature", "not a finite number"]),
    (["generate", "Hello", "--temperature", "-1"], ["--temperature", "negative"]),
    (["generate", "Hello", "--top-p", "0"], ["--top-p", "not in (0, 1]"]),
    (["score", "Hello", "-a", "x:y"], ["--adapter", "must be a finite number"]),
    (["serve", "--port", "70000"], ["--port"]),
    (["tag", "only-a-ref"], ["Missing argument 'TAG'"]),
    (["no-such-command"], ["No such command"]),
])
def test_bad_values_are_one_error_line(args, fragments, tmp_path):
    assert_one_error_line(run_hub(*args, home=tmp_path), *fragments)


def _bad_number_cases():
    """Every int/float option of every command, given `abc` (the required arguments and options filled in)."""
    for path, command in commands():
        filled = [a for p in command.params if p.required for a in
                  ((p.opts[0], "x") if p.param_type_name == "option" else ("x",))]
        for p in command.params:
            if p.param_type_name == "option" and p.bare_type() in ("int", "float"):
                yield pytest.param([*path, *filled, p.opts[0], "abc"], p.opts[0], id=" ".join((*path, p.opts[0])))


@pytest.mark.parametrize(("args", "option"), list(_bad_number_cases()))
def test_every_numeric_option_refuses_a_non_number_in_one_line(args, option, tmp_path):
    done = run_hub(*args, home=tmp_path)
    assert done.returncode == 2
    assert_one_error_line(done, option)


def test_every_command_and_option_has_help_text():
    missing = [" ".join(path) or "hub" for path, command in commands() if not command.help]
    missing += [f"{' '.join(path)} {p.opts[0] if p.opts and p.opts[0].startswith('-') else p.name}"
                for path, command in commands() for p in command.params if not p.help]
    assert missing == []


@pytest.mark.slow  # renders the help of every command
def test_help_renders_flags_as_flags_and_placeholders_in_capitals(tmp_path):
    for path, command in commands():
        done = run_hub(*path, "--help", home=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "<bool>" not in done.stdout, (path, done.stdout)
        usage = done.stdout.split("Usage: ", 1)[1].splitlines()[0]
        placeholders = re.findall(r"[{\[]([A-Za-z_]+)[}\]]", usage)
        assert all(p.isupper() for p in placeholders), (path, usage)


def test_version(tmp_path):
    done = run_hub("--version", home=tmp_path)
    assert done.returncode == 0 and done.stdout == f"hub {version('adapterhub-serve')}\n"


def test_shell_completion_script_and_completions(tmp_path):
    script = run_hub("--show-completion", "bash", home=tmp_path)
    assert script.returncode == 0 and "_HUB_COMPLETE" in script.stdout
    done = run_hub(home=tmp_path, env={"_HUB_COMPLETE": "complete_bash", "COMP_WORDS": "hub gene", "COMP_CWORD": "1"})
    assert done.returncode == 0 and done.stdout.split() == ["generate"]


def test_an_unexpected_exception_is_one_line_with_the_traceback_on_request(tmp_path):
    """A remotes.json that is not UTF-8 raises UnicodeDecodeError, which no command expects: one line and a
    hint, not Typer's boxed traceback; HUB_DEBUG=1 shows the traceback."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "remotes.json").write_bytes(b"\xff\xfe{")
    done = run_hub("remote", "list", home=tmp_path, env={"HUB_DEBUG": "0"})
    assert done.returncode == 1
    assert_one_error_line(done, "error: unexpected UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff",
                          "rerun with HUB_DEBUG=1 for the traceback")
    debug = run_hub("remote", "list", home=tmp_path, env={"HUB_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UnicodeDecodeError" in debug.stderr


def _converted(converter, param, value):
    try:
        return converter._coerce_value(value, param=param, ctx=None)
    except typer.BadParameter as e:
        return f"BadParameter: {e.format_message()}"


@pytest.mark.parametrize("name, option, values", [
    ("list", "limit", ["20", "0", "-3", "007", "+5", " 5", "1_000", "2.0", "abc", "", "99999999999999999999"]),
    ("generate", "max_new_tokens", ["1", "0", "-1", "48", "007"]),  # min=1
    ("show", "ref", ["team/bot@1.0.0", "", " x "]),
    ("show", "registry", ["", ".", "no/such/folder", "~/x"]),
    ("push", "paths", [("a", "b"), ("only",)]),
])
def test_plain_values_are_converted_as_typer_converts_them(name, option, values):
    """hub.clikit.PlainValues converts what it converts itself exactly as Typer's pydantic adapters do, and
    hands the rest (with their error messages) to them."""
    from typer._coercion import build_runtime_param

    from hub.clikit import PlainValues

    param = next(p for p in typer.main.get_command(app).commands[name].params if p.name == option)
    descriptor = param.type_descriptor
    ours, typers = PlainValues(descriptor.parameter_info, descriptor.annotation, descriptor), \
        build_runtime_param(descriptor)
    for value in values:
        mine, theirs = _converted(ours, param, value), _converted(typers, param, value)
        assert (type(mine), mine) == (type(theirs), theirs), (option, value)
