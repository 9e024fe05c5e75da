"""The registry commands of `hub` (push, pull, list, show, tags, verify, gc, export, base, remote).

The entry module `hub.cli` mounts them beside the merge, train, eval and runtime groups."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from hub import basemodel, evals
from hub.artifact import ArtifactError
from hub.batch import BatchError, read_batch
from hub.clikit import REF_ARG, fail, printable, table
from hub.errors import HubError
from hub.manifest import Manifest, check_name, check_version, parse_ref
from hub.registry import Registry, open_registry
from hub.remotes import Remote, Remotes

app = typer.Typer()
base_app = typer.Typer(no_args_is_help=True, help="The base models the hub serves adapters on.")
app.add_typer(base_app, name="base")
remote_app = typer.Typer(no_args_is_help=True, help="Named remotes: directory registries and hf://org/repo.")
app.add_typer(remote_app, name="remote")


@base_app.command("prepare")
def base_prepare(name: str = typer.Argument(basemodel.DEFAULT_BASE_MODEL, help="Embedded base model name.")) -> None:
    """Convert an embedded base model into a cached HF folder (once) and print its path."""
    if name not in basemodel.EMBEDDED:
        fail(f"unknown embedded base model {name!r}; known: {', '.join(basemodel.EMBEDDED)}")
    try:
        typer.echo(basemodel.prepare_embedded(name))
    except basemodel.BaseModelError as e:
        fail(str(e))


@base_app.command("generate")
def base_generate(
    prompt: str = typer.Argument(..., help="The user message."),
    base_model: str = typer.Option(basemodel.DEFAULT_BASE_MODEL, "--base-model",
                                   help="Embedded name, folder or HF id."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="Most tokens to generate."),
) -> None:
    """Greedy chat reply from the base model alone, in-process (no server, no adapters)."""
    try:
        model, tokenizer = basemodel.load(base_model)
    except basemodel.BaseModelError as e:
        fail(str(e))
    typer.echo(basemodel.chat_reply(model, tokenizer, prompt, max_new_tokens=max_new_tokens))



# ---------------------------------------------------------------- registry commands

REGISTRY_OPT = typer.Option(None, "--registry", help="Registry folder (default: $HUB_HOME).")


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Turn every expected failure into one line and a non-zero exit."""
    try:
        yield
    except BrokenPipeError:  # e.g. `hub show X | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None
    except (HubError, ArtifactError, OSError) as e:
        fail(str(e))


@contextmanager
def _progress(description: str, total: int | None) -> Iterator:
    """A byte progress bar on stderr; yields the callback the registry advances."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def _remote(registry: Registry, spec: str | None) -> Remote:
    remotes = Remotes(registry.root)
    if spec is None:
        configured = remotes.all()
        if len(configured) != 1 and "origin" not in configured:
            raise HubError(f"name a remote with --from (configured: {', '.join(configured) or 'none'})")
        spec = "origin" if "origin" in configured else next(iter(configured))
    return remotes.open(spec)


def _publish(reg: Registry, manifest: Manifest, remote: Remote) -> str:
    """Send one registry version (and the tags that point at it) to a remote; returns the line that says so."""
    with _progress(f"push {manifest.ref} -> {remote.url}", manifest.size) as advance:
        where = remote.publish(manifest, reg, advance)
    tags = reg.version_tags(manifest)
    return f"pushed {manifest.ref} to {where}" + (f" with tags: {', '.join(tags)}" if tags else "")


@app.command()
def push(
    paths: list[str] | None = typer.Argument(None, metavar="PATH...", help="Adapter folder(s) (PEFT format, ours, or "
                                             "an AdapterHub `adapters` folder); or, with --to and no --name/--version, "
                                             "a version already in the registry."),
    name: str | None = typer.Option(None, "--name", help="Adapter name, optionally org/name; {dir} stands for each "
                                                         "folder's own name (e.g. team/{dir})."),
    version: str | None = typer.Option(None, "--version", help="Semantic version, e.g. 1.2.0; may use {dir} too."),
    base_model: str | None = typer.Option(None, "--base-model", help="Base model to check against and record."),
    to: str | None = typer.Option(None, "--to", help="Also push to this remote (name, path, file:// or hf://)."),
    description: str = typer.Option("", "--description", help="One line for `hub show` and `hub list --json`."),
    tags: str = typer.Option("", "--tags", help="Comma-separated descriptive tags for the manifest."),
    license: str | None = typer.Option(None, "--license", help="SPDX id, e.g. apache-2.0 (default: none)."),
    in_place: bool = typer.Option(False, "--in-place", help="Record a folder inside the registry by relative path."),
    batch: Path | None = typer.Option(None, "--batch", help="Push the folders a JSON Lines file lists, one "
                                      '{"path", "name", "version"} a line (optional: base_model, description, tags, '
                                      "license; the options above fill them); all or nothing."),
    registry: Path | None = REGISTRY_OPT,
) -> None:
    """Validate adapter folders and add each to the registry as NAME@VERSION; or publish a registry version."""
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    if batch is not None:
        defaults = dict(base_model=base_model, description=description, tags=tag_list, license=license)
        _push_batch(registry, batch, defaults, refused=bool(paths or name or version or to or in_place))
        return
    with _clear_errors():
        if not paths:
            raise HubError("give the adapter folder(s) to push, or --batch FILE")
        reg = Registry(registry)
        remote = _remote(reg, to) if to is not None else None  # a bad remote fails before any work
        path = paths[0]
        if name is None and version is None:
            if len(paths) > 1:
                raise HubError("give --name and --version to push several folders, e.g. --name 'team/{dir}'")
            if Path(path).is_dir():
                raise HubError(f"give --name and --version to push the folder {path}")
            if remote is None:
                raise HubError(f"{path} is no folder; to publish a registry version give --to REMOTE")
            if base_model or description or tags or license or in_place:
                raise HubError("--base-model, --description, --tags, --license and --in-place apply to folders: "
                               "a registry version is published as it is")
            typer.echo(_publish(reg, reg.resolve(path), remote))
            return
        if name is None or version is None:
            raise HubError("give both --name and --version to push a folder")
        jobs = _expand(paths, name, version)
        if len(jobs) > 1 and remote is not None:
            raise HubError("--to takes one folder: push the folders, then `hub push REF --to REMOTE` for each")
        options = dict(base_model=base_model, description=description, license=license, in_place=in_place,
                       tags=tag_list)
        for done, (path, name, version) in enumerate(jobs):
            try:
                _push_folder(reg, path, name, version, remote, options)
            except (HubError, ArtifactError, OSError) as e:
                if len(jobs) == 1:
                    raise
                raise HubError(f"{name}@{version} ({path}): {e}; {done} of {len(jobs)} folders were pushed before "
                               "it") from None


def _push_batch(registry: Path | None, file: Path, defaults: dict, refused: bool) -> None:
    """`hub push --batch FILE`: every line checked first (each bad one reported by number), then the folders
    pushed in order; a folder that fails removes the versions this run added, so the registry is as before."""
    with _clear_errors():
        if refused:
            raise HubError("--batch takes no PATH, --name, --version, --to or --in-place: the file names each "
                           "folder, its name and version")
        try:
            entries = read_batch(file, defaults)
        except BatchError as e:
            for problem in e.problems:
                typer.echo(f"error: {printable(problem)}", err=True)
            raise typer.Exit(1) from None
        reg = Registry(registry)
        added: list[Manifest] = []
        entry = entries[0]
        try:
            for entry in entries:
                manifest = _push_folder(reg, str(entry.path), entry.name, entry.version, None,
                                        {**entry.options, "in_place": False})
                if manifest is not None:
                    added.append(manifest)
        except BaseException as e:
            for manifest in reversed(added):
                reg.discard(manifest)
            if not isinstance(e, (HubError, ArtifactError, OSError)):
                raise
            raise HubError(f"{file}:{entry.line}: {entry.name}@{entry.version} ({entry.path}): {e}; nothing was "
                           f"pushed (the {len(added)} versions this run had added are removed)") from None


def _expand(paths: list[str], name: str, version: str) -> list[tuple[str, str, str]]:
    """(folder, name, version) for each folder, `{dir}` in the name and version standing for the folder's own
    name; all checked before anything is pushed, and no two folders may give the same version."""
    jobs: list[tuple[str, str, str]] = []
    seen: dict[tuple[str, str], str] = {}
    for path in paths:
        folder = Path(path).resolve().name
        ref = (check_name(name.replace("{dir}", folder)), check_version(version.replace("{dir}", folder)))
        if ref in seen:
            raise HubError(f"{seen[ref]} and {path} would both be {ref[0]}@{ref[1]}: "
                           "put {dir} in --name or --version")
        seen[ref] = path
        jobs.append((path, *ref))
    return jobs


def _push_folder(reg: Registry, path: str, name: str, version: str, remote: Remote | None,
                 options: dict) -> Manifest | None:
    """Push one folder (and send it to `remote`), printing what happened; returns the version if this call
    added it (None: it was there already)."""
    existed = reg.index().get(name, version) is not None
    with _progress(f"push {name}@{version}", _folder_size(Path(path))) as advance:
        manifest = reg.push(path, name, version, progress=advance, **options)
    note = "" if manifest.base_model.fingerprint else (
        " (no base model named: fit not checked)" if manifest.base_model.id is None
        else " (base model not at hand: fit not checked)")
    published = None
    if remote is not None:
        try:
            published = _publish(reg, manifest, remote)
        except BaseException:
            if not existed:  # the command failed: leave the local registry as it was too
                reg.discard(manifest)
            raise
    verb = "unchanged" if existed else "pushed"  # the same files and metadata again: nothing to do
    typer.echo(f"{verb} {manifest.ref} {manifest.technique} sha256:{manifest.sha256[:12]}{note}")
    if published:
        typer.echo(published)
    return None if existed else manifest


@app.command()
def pull(
    ref: str = REF_ARG,
    source: str | None = typer.Option(None, "--from", help="Remote name, path, file:// or hf://org/repo."),
    revision: str | None = typer.Option(None, "--revision", help="HF remotes: the git revision to download."),
    registry: Path | None = REGISTRY_OPT,
) -> None:
    """Copy a version from a remote into the registry, verifying every file's sha256.

    Pulling `name@tag` also points the local tag at the pulled version (moving it if it exists), so
    the same ref resolves here as it did on the remote.
    """
    with _clear_errors():
        reg = Registry(registry)
        remote = _remote(reg, source)
        name, _, tag = parse_ref(ref)
        index = reg.index()
        before = _blob_ids(reg, list(index.manifests([name])))
        with _progress(f"pull {ref} <- {remote.url}", None) as advance:
            manifest = remote.fetch(ref, reg, advance, revision=revision)
        typer.echo(f"pulled {manifest.ref} {manifest.technique} sha256:{manifest.sha256[:12]}")
        after = _blob_ids(reg, [manifest])
        replaced = sum(before[d] != after[d] for d in after if d in before)
        if replaced:
            _say_repaired(manifest, remote, replaced)
        if tag is not None:
            reg.tag(manifest.ref, tag)
            typer.echo(f"tagged {manifest.name}@{tag} -> {manifest.version}")


def _blob_ids(reg: Registry, manifests: list[Manifest]) -> dict[str, tuple[int, int] | None]:
    """Digest -> (inode, mtime) of each stored blob of these versions (None: missing). The store replaces a
    damaged or missing blob by renaming a new file over it and leaves an intact one alone, so a blob whose
    identity changed across a pull was repaired by it."""
    ids: dict[str, tuple[int, int] | None] = {}
    for m in manifests:
        for info in m.files.values() if m.path is None else ():
            try:
                st = reg.store.path(info["sha256"]).stat()
                ids[info["sha256"]] = (st.st_ino, st.st_mtime_ns)
            except FileNotFoundError:
                ids[info["sha256"]] = None
    return ids


def _say_repaired(manifest: Manifest, remote: Remote, files: int) -> None:
    typer.echo(f"repaired {manifest.ref} from {remote.url} ({files} file{'s' if files != 1 else ''})")


def _row(m: Manifest, tags: dict[str, str]) -> list[str]:
    labels = ",".join(t for t, v in sorted(tags.items()) if v == m.version)
    cells = [m.ref, m.technique, m.base_model.id or "-", f"{m.params:,}", labels or "-", m.created]
    return [printable(c) for c in cells]


@app.command("list")
def list_(
    base_model: str | None = typer.Option(None, "--base-model", help="Only versions pushed for this base model."),
    technique: str | None = typer.Option(None, "--technique", help="Only this technique (lora, ia3, ...)."),
    name: str | None = typer.Option(None, "--name", help="Only adapters whose name starts with this."),
    tag: str | None = typer.Option(None, "--tag", help="Only versions a tag points at, or with this descriptive tag."),
    limit: int | None = typer.Option(None, "--limit", help="At most this many versions."),
    sort: str | None = typer.Option(None, "--sort", help="Rank by this evaluation metric (loss, accuracy, ...)."),
    dataset: str | None = typer.Option(None, "--dataset", help="With --sort: the data set's sha256 (or a prefix)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifests as JSON."),
    registry: Path | None = REGISTRY_OPT,
) -> None:
    """List every version (optionally filtered), in name and version order; or ranked by an evaluation metric."""
    if sort is not None or dataset is not None:
        with _clear_errors():
            _print_ranked(registry, sort, dataset, as_json, base_model=base_model, technique=technique, name=name,
                          tag=tag, limit=limit)
        return
    _print_versions(registry, as_json, base_model=base_model, technique=technique, name=name, tag=tag, limit=limit)


def _print_ranked(registry: Path | None, metric: str | None, dataset: str | None, as_json: bool, **filters) -> None:
    """`hub list --sort`: the versions best first by their newest evaluation record of `metric`."""
    if metric is None:
        raise HubError("--dataset applies with --sort METRIC")
    reg = open_registry(registry)
    limit = filters.pop("limit")  # the best ones, not the first ones by name
    ranked = evals.rank(reg.root, reg.list(**filters), metric, dataset)[:limit]
    if as_json:
        typer.echo(json.dumps([{"ref": m.ref, "evaluation": r} for m, r in ranked], indent=1))
        return
    typer.echo(table(evals.ranked_rows(ranked, metric)))


@app.command()
def search(
    text: str = typer.Argument(..., metavar="TEXT", help="Text to look for, in any case."),
    limit: int | None = typer.Option(None, "--limit", help="At most this many versions."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifests as JSON."),
    registry: Path | None = REGISTRY_OPT,
) -> None:
    """List the versions whose name, description or a descriptive tag contains TEXT (any case)."""
    _print_versions(registry, as_json, text=text, limit=limit)


def _print_versions(registry: Path | None, as_json: bool, **filters) -> None:
    """`hub list` and `hub search`: the versions `Registry.list(**filters)` returns, as a table or JSON."""
    with _clear_errors():
        reg = open_registry(registry)
        manifests = reg.list(**filters)
        if as_json:
            typer.echo(json.dumps([m.to_dict() for m in manifests], indent=1))
            return
        rows = [["REF", "TECHNIQUE", "BASE MODEL", "PARAMS", "TAGS", "CREATED"]]
        rows += [_row(m, reg.tags(m.name)) for m in manifests]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@app.command()
def show(
    ref: str = REF_ARG, as_json: bool = typer.Option(False, "--json", help="Print it as JSON."),
    registry: Path | None = REGISTRY_OPT,
) -> None:
    """Print one version's manifest."""
    with _clear_errors():
        reg = open_registry(registry)
        manifest = reg.resolve(ref)
        data = manifest.to_dict()
        data["ref_tags"] = reg.version_tags(manifest)
        data["evaluations"] = evals.read(reg.root, manifest)
        if as_json:
            typer.echo(json.dumps(data, indent=1))
            return
        for key, value in data.items():
            if key == "evaluations":
                typer.echo(f"{key}: {len(value)}" + "".join(f"\n  {printable(evals.describe(r))}" for r in value))
                continue
            shown = printable(value) if isinstance(value, str) else json.dumps(value, default=str)  # JSON escapes
            typer.echo(f"{key}: {shown}")


@app.command()
def tag(ref: str = REF_ARG, tag_name: str = typer.Argument(..., metavar="TAG", help="Tag name, e.g. stable."),
        registry: Path | None = REGISTRY_OPT) -> None:
    """Point NAME@TAG at the version REF resolves to."""
    with _clear_errors():
        manifest = open_registry(registry).tag(ref, tag_name)
        typer.echo(f"{manifest.name}@{tag_name} -> {manifest.version}")


@app.command()
def untag(ref: str = typer.Argument(..., metavar="NAME@TAG", help="The tag to delete, e.g. team/bot@stable."),
          registry: Path | None = REGISTRY_OPT) -> None:
    """Delete a tag; the version it points at stays."""
    with _clear_errors():
        manifest = open_registry(registry).untag(ref)
        typer.echo(f"deleted tag {ref} (was {manifest.version})")


@app.command()
def rm(ref: str = typer.Argument(..., metavar="NAME@VERSION", help="The version to remove, e.g. team/bot@1.2.0."),
       registry: Path | None = REGISTRY_OPT) -> None:
    """Remove one version and the tags that point at it; `hub gc` then frees its blobs."""
    with _clear_errors():
        manifest, tags = open_registry(registry).remove(ref)
        typer.echo(f"removed {manifest.ref}" + (f" and its tags: {', '.join(tags)}" if tags else ""))


@app.command()
def verify(
    ref: str | None = typer.Argument(None, metavar="REF", help="name, name@1.2.0 or name@tag (default: all)."),
    repair: bool = typer.Option(False, "--repair", help="Re-fetch damaged or missing files from the remote."),
    source: str | None = typer.Option(None, "--from", help="With --repair: the remote (default: the only one)."),
    registry: Path | None = REGISTRY_OPT,
) -> None:
    """Re-hash every file of every version (or of REF); exit 1 on any mismatch left."""
    with _clear_errors():
        if source is not None and not repair:
            fail("--from applies to --repair")
        reg = open_registry(registry)
        checked, problems = reg.verify(ref)
        if repair and (problems or source is not None):  # no remote is asked for when nothing needs repair
            remote = _remote(reg, source)  # a named one is checked either way
            if problems:
                problems = _repair(reg, remote, ref)
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {checked} files verified")


def _repair(reg: Registry, remote: Remote, ref: str | None) -> list[str]:
    """Pull every damaged version again from `remote` (which replaces its damaged blobs); says what it
    repaired and returns the problems left."""
    left: list[str] = []
    for manifest, problems in reg.damaged([reg.resolve(ref)] if ref else list(reg.index().manifests())):
        if manifest.path is not None:
            left += [f"{p}: not repaired: the version lives in a folder of the registry" for p in problems]
            continue
        try:
            remote.fetch(manifest.ref, reg)
        except HubError as e:
            left += [f"{p}: not repaired from {remote.url}: {e}" for p in problems]
            continue
        _say_repaired(manifest, remote, len(problems))
    return left


@app.command()
def gc(registry: Path | None = REGISTRY_OPT) -> None:
    """Remove blobs and checkouts no version refers to, and temp files of dead processes."""
    with _clear_errors():
        report = open_registry(registry).gc()
        typer.echo(f"removed {report.blobs} blobs ({report.bytes:,} bytes), {report.checkouts} checkouts, "
                   f"{report.temps} temp files")


@app.command()
def export(
    ref: str | None = typer.Argument(None, metavar="REF", help="name, name@1.2.0 or name@tag; none: the whole "
                                                               "index as one registry.json."),
    out: Path | None = typer.Option(None, "--out", help="New folder to write (the index: a file; default stdout)."),
    registry: Path | None = REGISTRY_OPT,
    merged: bool = typer.Option(False, "--merged", help="Write a full HF model: the adapter folded into the base."),
    base_model: str | None = typer.Option(None, "--base-model", help="With --merged: the base (default: as pushed)."),
    dtype: str | None = typer.Option(None, "--dtype", help="With --merged: float32, bfloat16 or float16 "
                                                           "(default: the base's own)."),
) -> None:
    """Write a version's files to a folder (PEFT's `PeftModel.from_pretrained` loads PEFT techniques); without
    REF, every version and tag as one registry.json (hub/registry.schema.json), the listing a repository ships."""
    with _clear_errors():
        if ref is None:
            if merged or base_model or dtype:
                fail("--merged, --base-model and --dtype apply to one version: give its REF")
            _export_listing(open_registry(registry), out)
            return
        if out is None:
            fail("give --out DIR: the new folder for the version's files")
        if dtype is not None and not merged:
            fail("--dtype applies to --merged exports only (an adapter's files are copied as they are)")
        if dtype not in (None, *basemodel.DTYPES):
            fail(f"--dtype must be one of {', '.join(basemodel.DTYPES)}, got {dtype!r}")
        if merged:
            from hub.merge_cli import export_merged_version

            typer.echo(export_merged_version(open_registry(registry), ref, base_model, out, dtype))
            return
        typer.echo(open_registry(registry).export(ref, out))


def _export_listing(reg: Registry, out: Path | None) -> None:
    from hub.index import atomic_write_json

    data = reg.listing()
    if out is None:
        typer.echo(json.dumps(data, indent=1, sort_keys=True))
        return
    atomic_write_json(out, data, tmp_dir=out.parent)
    versions = sum(len(entry["versions"]) for entry in data["adapters"].values())
    typer.echo(f"wrote {out} ({versions} versions)")


@app.command()
def migrate(registry: Path | None = REGISTRY_OPT) -> None:
    """Convert a registry.json registry to the refs/ layout (one file per version), atomically."""
    with _clear_errors():
        reg = open_registry(registry)
        count = reg.migrate()
        typer.echo(f"migrated {count} versions to {reg.root / 'refs'} (the old index is registry.json.migrated)")


@remote_app.command("add")
def remote_add(name: str = typer.Argument(..., help="Remote name, e.g. origin."),
               url: str = typer.Argument(..., help="Folder path, file:///path or hf://org/repo."),
               registry: Path | None = REGISTRY_OPT) -> None:
    """Name a remote: a folder path, file:///path, or hf://org/repo."""
    with _clear_errors():
        typer.echo(f"{name} -> {Remotes(Registry(registry).root).add(name, url)}")


@remote_app.command("list")
def remote_list(registry: Path | None = REGISTRY_OPT) -> None:
    """Print each remote's name and URL."""
    with _clear_errors():
        for name, url in sorted(Remotes(Registry(registry).root).all().items()):
            typer.echo(f"{name}\t{url}")


@remote_app.command("rm")
def remote_rm(name: str = typer.Argument(..., help="Remote name."), registry: Path | None = REGISTRY_OPT) -> None:
    """Forget a remote (its contents are untouched)."""
    with _clear_errors():
        Remotes(Registry(registry).root).remove(name)
        typer.echo(f"removed remote {name}")
