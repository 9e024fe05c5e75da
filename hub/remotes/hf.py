"""The Hugging Face Hub as a remote (`hf://org/repo`): one repo per adapter, one git tag per version.

Push is a thin use of the real client: upload the artifact's files plus `hub-manifest.json` (and a
model card carrying `base_model` and, for PEFT techniques, `library_name: peft`, unless the
artifact ships its own; and `hub-evals.jsonl`, the version's evaluation records, if it has any),
then tag the commit `v<version>`. Pull downloads that revision with `snapshot_download` (which also
reads a local HF cache offline) and verifies every file against the manifest's sha256. A plain PEFT
adapter repo (no manifest) is imported like a local folder.

Evaluation records grow after a version is published, but a version's tag is its content and git tags
do not move, so records also live on a branch of their own, `hub-evals`, one `hub-evals/<version>.jsonl`
per version: every push of a version merges its local records into that file (a version already tagged
is not uploaded again, once its manifest there is found to be the same content), and a pull adds the
records of both the tag and the branch.

What a name or a tag names now (`current`, asked by a serving pool on every request) comes from the repo's git
tags, listed by one call (`list_repo_refs`) that answers for `HUB_HF_REFS_SECONDS` seconds, so a burst of requests
costs one call and a tag moved on the Hub is seen once that time has passed.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hub import evals
from hub.artifact import Technique
from hub.errors import HubError, NotFound, RemoteError
from hub.files import check_regular, resolve_within
from hub.index import load_manifest
from hub.manifest import VERSION_RE, Manifest, parse_ref, version_key
from hub.registry import Registry
from hub.remotes import Remote
from hub.store import Progress

MANIFEST_FILE = "hub-manifest.json"
EVALS_FILE = "hub-evals.jsonl"  # the version's evaluation records when it was pushed (hub/evals.py)
EVALS_BRANCH = "hub-evals"  # every version's records as they grow: hub-evals/<version>.jsonl on this branch
CARD_FILE = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PEFT_TECHNIQUES = {Technique.LORA.value, Technique.IA3.value, Technique.PROMPT_TUNING.value}
REFS_SECONDS_VAR = "HUB_HF_REFS_SECONDS"  # how long one listing of a repo's tags answers `current`
DEFAULT_REFS_SECONDS = 5.0  # a burst of requests costs one call; a moved tag is served within this time


def refs_seconds() -> float:
    """The configured listing lifetime (HUB_HF_REFS_SECONDS, seconds >= 0; 0 lists on every request)."""
    raw = os.environ.get(REFS_SECONDS_VAR, "").strip()
    if not raw:
        return DEFAULT_REFS_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise RemoteError(f"{REFS_SECONDS_VAR}={raw!r}: give a number of seconds, 0 or more")
    return seconds


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
        self.refs_seconds = refs_seconds()
        self._refs_lock = threading.Lock()  # concurrent requests wait for one listing rather than each making one
        self._listed_at = -math.inf
        self._listing: dict[str, str] | HubError | None = None  # tag -> commit, or why the last listing failed
        self._last_good: dict[str, str] | None = None  # what answers while the Hub is unreachable

    def current(self, ref: str) -> str | None:
        """A name is its highest version tag (`v<version>`), as a registry resolves a name; `name@tag` is the
        version whose tag is on the same commit. None where the tags cannot say (a plain PEFT repo, a tag on an
        untagged commit). While the Hub is unreachable the last listing read answers (what was served so far);
        with none, RemoteError and the local registry answers."""
        name, version, tag = parse_ref(ref)
        tags = self._tags()
        versions = {t[1:]: commit for t, commit in tags.items() if t[:1] == "v" and VERSION_RE.fullmatch(t[1:])}
        if version is not None:
            if version not in versions:
                raise NotFound(f"{self.url} has no tag v{version}")
            return ref
        if tag is not None and tag not in tags:
            raise NotFound(f"{self.url} has no tag {tag!r}")
        named = [v for v, commit in versions.items() if tag is None or commit == tags[tag]]
        return f"{name}@{max(named, key=version_key)}" if named else None

    def _tags(self) -> dict[str, str]:
        """The repo's tags, listed at most once per `refs_seconds` (a failure too, so an outage costs one call)."""
        with self._refs_lock:
            if time.monotonic() - self._listed_at >= self.refs_seconds:
                self._listing = self._list_tags()
                self._listed_at = time.monotonic()
                if not isinstance(self._listing, HubError):
                    self._last_good = self._listing
            listing, last_good = self._listing, self._last_good
        if isinstance(listing, dict):
            return listing
        if isinstance(listing, RemoteError) and last_good is not None:
            return last_good
        assert listing is not None, "the first call lists the tags"
        raise listing.__class__(str(listing))

    def _list_tags(self) -> dict[str, str] | HubError:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            refs = HfApi().list_repo_refs(self.repo_id)
        except RepositoryNotFoundError:
            return NotFound(f"{self.url}: no such repo")
        except Exception as e:  # network boundary: the client raises many kinds; report one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return RemoteError(f"{self.url}: cannot list tags ({e.__class__.__name__}: {reason})")
        return {t.name: t.target_commit for t in refs.tags}

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
            grown = self._branch_records(manifest)  # before the version is added: a failure changes nothing
            added = local.add_files(folder, manifest.renamed(name, manifest.version), progress)
            evals.append(local.root, added, evals.read_file(folder / EVALS_FILE, added) + grown)
            return added
        if version is None:
            raise RemoteError(
                f"{self.url}@{revision} is a plain adapter repo (no {MANIFEST_FILE}): give the version to record "
                f"it under, e.g. `hub pull {name}@1.0.0 --from {self.url} --revision {revision}`"
            )
        return local.push(folder, name, version, lineage={"imported_from": f"{self.url}@{revision}"}, progress=progress)

    def _branch_records(self, manifest: Manifest) -> list[dict]:
        """The version's records on the records branch (none when the branch or its file is missing)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RevisionNotFoundError

        try:
            path = hf_hub_download(self.repo_id, _records_name(manifest), revision=EVALS_BRANCH)
        except (EntryNotFoundError, LocalEntryNotFoundError, RevisionNotFoundError):
            return []
        except Exception as e:  # network boundary: one line
            raise RemoteError(f"{self.url}@{EVALS_BRANCH}: cannot download the evaluation records ({e})") from None
        return evals.read_file(Path(path), manifest)

    def publish(self, manifest: Manifest, local: Registry, progress: Progress | None = None) -> str:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RevisionNotFoundError

        api = HfApi()
        version_tag = f"v{manifest.version}"
        with tempfile.TemporaryDirectory(prefix="hub-hf-") as tmp:
            stage(manifest, local, Path(tmp))
            try:
                api.create_repo(self.repo_id, exist_ok=True)
                refs = api.list_repo_refs(self.repo_id)
                tagged = {t.name: t.target_commit for t in refs.tags}
                if version_tag in tagged:  # published before: the same content, or nothing is changed
                    self._check_same(api, manifest, version_tag)
                    commit = tagged[version_tag]
                else:
                    commit = api.upload_folder(
                        repo_id=self.repo_id, folder_path=tmp, delete_patterns="*",
                        commit_message=f"{manifest.ref} ({manifest.technique})",
                    ).oid
                    api.create_tag(self.repo_id, tag=version_tag, revision=commit)
                for tag in local.version_tags(manifest):  # a git tag cannot be moved: delete, then create
                    try:
                        api.delete_tag(self.repo_id, tag=tag)
                    except RevisionNotFoundError:
                        pass
                    api.create_tag(self.repo_id, tag=tag, revision=commit)
                self._publish_records(api, manifest, local, {b.name: b.target_commit for b in refs.branches})
            except RemoteError:
                raise
            except Exception as e:  # network boundary: the client raises many kinds; report one line
                reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise RemoteError(f"{self.url}: push failed ({e.__class__.__name__}: {reason})") from None
        return f"{self.url}@{version_tag}"

    def _check_same(self, api, manifest: Manifest, version_tag: str) -> None:
        """RemoteError unless the version tagged here is the content being pushed (a version never changes)."""
        path = api.hf_hub_download(self.repo_id, MANIFEST_FILE, revision=version_tag)
        try:
            there = json.loads(Path(path).read_text()).get("sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            there = None
        if there != manifest.sha256:
            raise RemoteError(f"{self.url}@{version_tag} holds other content (sha256 {str(there)[:12]}, pushing "
                              f"{manifest.sha256[:12]}): a version never changes, push a new version")

    def _publish_records(self, api, manifest: Manifest, local: Registry, branches: dict[str, str]) -> None:
        """Merge the version's local records into its file on the records branch (one commit, only when some
        are new there; `parent_commit` makes a concurrent push fail rather than drop the other's records)."""
        from huggingface_hub.errors import EntryNotFoundError

        records = evals.read(local.root, manifest)
        if not records:
            return
        held: list[dict] = []
        if EVALS_BRANCH in branches:
            try:
                held = evals.read_file(Path(api.hf_hub_download(self.repo_id, _records_name(manifest),
                                                                revision=branches[EVALS_BRANCH])), manifest)
            except EntryNotFoundError:
                pass
        else:
            api.create_branch(self.repo_id, branch=EVALS_BRANCH, exist_ok=True)
        ids = {r["id"] for r in held}
        new = [r for r in records if r["id"] not in ids]
        if new:
            api.upload_file(path_or_fileobj=evals.lines(held + new).encode(), path_in_repo=_records_name(manifest),
                            repo_id=self.repo_id, revision=EVALS_BRANCH, parent_commit=branches.get(EVALS_BRANCH),
                            commit_message=f"{manifest.ref}: {len(new)} evaluation record(s)")


def _records_name(manifest: Manifest) -> str:
    """The version's records file on the records branch."""
    return f"{EVALS_BRANCH}/{manifest.version}.jsonl"
