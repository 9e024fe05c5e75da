"""The Hugging Face Hub as a remote (`hf://org/repo`): one repo per adapter, one git tag per version.

Push is a thin use of the real client: upload the artifact's files plus `hub-manifest.json` (and a
model card carrying `base_model` and, for PEFT techniques, `library_name: peft`, unless the
artifact ships its own; and `hub-evals.jsonl`, the version's evaluation records, if it has any),
then tag the commit `v<version>`; a pull adds the records it finds. Pull downloads that revision with
`snapshot_download` (which also reads a local HF cache offline) and verifies every file against
the manifest's sha256. A plain PEFT adapter repo (no manifest) is imported like a local folder.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hub import evals
from hub.artifact import Technique
from hub.errors import RemoteError
from hub.files import check_regular, resolve_within
from hub.index import load_manifest
from hub.manifest import Manifest, parse_ref
from hub.registry import Registry
from hub.remotes import Remote
from hub.store import Progress

MANIFEST_FILE = "hub-manifest.json"
EVALS_FILE = "hub-evals.jsonl"  # the version's evaluation records when it was pushed (hub/evals.py)
CARD_FILE = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PEFT_TECHNIQUES = {Technique.LORA.value, Technique.IA3.value, Technique.PROMPT_TUNING.value}


def model_card(manifest: Manifest) -> str:
    """A model card whose metadata the Hub indexes (base model, library, tags, license)."""
    from huggingface_hub import ModelCard, ModelCardData

    base = manifest.base_model.id
    data = ModelCardData(
        base_model=base if base and _REPO_ID.fullmatch(base) else None,
        library_name="peft" if manifest.technique in _PEFT_TECHNIQUES else None,
        license=manifest.license,
        tags=[manifest.technique, *manifest.tags],
    )
    body = manifest.description or f"A {manifest.technique} adapter."
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {manifest.name} {manifest.version}\n\n{body}\n"))


def stage(manifest: Manifest, local: Registry, dst: Path) -> None:
    """Lay out in `dst` exactly what a push uploads."""
    src = local.materialize(manifest)
    for name in manifest.files:
        (dst / name).write_bytes((src / name).read_bytes())
    published = manifest.to_dict()
    published.pop("path", None)
    (dst / MANIFEST_FILE).write_text(json.dumps(published, indent=1, sort_keys=True) + "\n")
    if CARD_FILE not in manifest.files:
        (dst / CARD_FILE).write_text(model_card(manifest))
    records = evals.read(local.root, manifest)
    if records:
        evals.write_file(dst / EVALS_FILE, records)


@contextmanager
def _regular_files(snapshot: Path) -> Iterator[Path]:
    """A snapshot of the Hugging Face cache as a folder of regular files: the cache links each file to its
    blob inside the repo's cache folder; a link leading anywhere else is refused (hub.files)."""
    repo_cache = snapshot.parent.parent  # models--org--repo/snapshots/<commit>
    with tempfile.TemporaryDirectory(prefix="hub-hf-") as tmp:
        for p in snapshot.iterdir():
            if p.is_dir() and not p.is_symlink():
                (Path(tmp) / p.name).mkdir()  # kept, so push refuses a sub-folder as for a local folder
            else:
                source = resolve_within(p, repo_cache) if p.is_symlink() else p
                check_regular(source)
                shutil.copyfile(source, Path(tmp) / p.name)
        yield Path(tmp)


class HFRemote(Remote):
    def __init__(self, repo_id: str):
        if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
            raise RemoteError(f"invalid Hugging Face repo {repo_id!r}: use hf://org/repo")
        self.repo_id = repo_id
        self.url = f"hf://{repo_id}"

    def _download(self, revision: str) -> Path:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(self.repo_id, revision=revision))
        except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise RemoteError(f"{self.url}@{revision}: cannot download ({reason})") from None

    def fetch(self, ref: str, local: Registry, progress: Progress | None = None, revision: str | None = None) -> Manifest:
        """`name@1.2.0` downloads tag `v1.2.0`, `name@tag` that revision, `name` `main` (or --revision)."""
        name, version, tag = parse_ref(ref)
        explicit = revision is not None
        revision = revision or (f"v{version}" if version else tag or "main")
        try:
            snapshot = self._download(revision)
        except RemoteError as e:
            if explicit or version is None:
                raise
            raise RemoteError(f"{e}; a plain PEFT repo has no version tags: add --revision main") from None
        with _regular_files(snapshot) as folder:
            return self._add(folder, name, version, revision, local, progress)

    def _add(self, folder: Path, name: str, version: str | None, revision: str, local: Registry,
             progress: Progress | None) -> Manifest:
        manifest_path = folder / MANIFEST_FILE
        if manifest_path.is_file():
            try:
                data = json.loads(manifest_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                reason = str(e) or "nested too deeply"
                raise RemoteError(f"{self.url}@{revision}: {MANIFEST_FILE} is not valid JSON ({reason})") from None
            manifest = load_manifest(data, f"{self.url}@{revision}/{MANIFEST_FILE}")
            if version is not None and manifest.version != version:
                raise RemoteError(f"{self.url}@{revision} holds version {manifest.version}, not {version}")
            added = local.add_files(folder, manifest.renamed(name, manifest.version), progress)
            evals.append(local.root, added, evals.read_file(folder / EVALS_FILE, added))
            return added
        if version is None:
            raise RemoteError(
                f"{self.url}@{revision} is a plain adapter repo (no {MANIFEST_FILE}): give the version to record "
                f"it under, e.g. `hub pull {name}@1.0.0 --from {self.url} --revision {revision}`"
            )
        return local.push(folder, name, version, lineage={"imported_from": f"{self.url}@{revision}"}, progress=progress)

    def publish(self, manifest: Manifest, local: Registry, progress: Progress | None = None) -> str:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RevisionNotFoundError

        api = HfApi()
        with tempfile.TemporaryDirectory(prefix="hub-hf-") as tmp:
            stage(manifest, local, Path(tmp))
            try:
                api.create_repo(self.repo_id, exist_ok=True)
                commit = api.upload_folder(
                    repo_id=self.repo_id, folder_path=tmp, delete_patterns="*",
                    commit_message=f"{manifest.ref} ({manifest.technique})",
                )
                api.create_tag(self.repo_id, tag=f"v{manifest.version}", revision=commit.oid)
                for tag in local.version_tags(manifest):  # a git tag cannot be moved: delete, then create
                    try:
                        api.delete_tag(self.repo_id, tag=tag)
                    except RevisionNotFoundError:
                        pass
                    api.create_tag(self.repo_id, tag=tag, revision=commit.oid)
            except Exception as e:  # network boundary: the client raises many kinds; report one line
                reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise RemoteError(f"{self.url}: push failed ({e.__class__.__name__}: {reason})") from None
        return f"{self.url}@v{manifest.version}"
