"""`hub merge`: merge registry versions into a new version whose manifest records how it was made.

The lineage names each parent by its exact `name@version` and artifact sha256 (tags and bare names
are resolved first), with the method and every parameter that shaped the result, so the same
command on the same registry reproduces the same files (DARE included: its seed is recorded).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import typer

from hub.artifact import ArtifactError, write_adapter
from hub.errors import HubError
from hub.manifest import Manifest
from hub.merge_spec import LORA_METHODS, MergeError, MergeSpec
from hub.registry import Registry, open_registry


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """'0.5,-1,2' -> (0.5, -1.0, 2.0); None stays None (every weight 1)."""
    if text is None:
        return None
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise MergeError(f"--weights takes comma-separated numbers, got {text!r}") from None


def merge_lineage(parents: list[Manifest], spec: MergeSpec) -> dict[str, Any]:
    """The manifest lineage of a merge: parents (exact refs + sha256), method and parameters."""
    return {
        "parents": [m.ref for m in parents],
        "merge": {"parents": [{"ref": m.ref, "sha256": m.sha256} for m in parents], **spec.params()},
    }


def merge_versions(registry: Registry, refs: list[str], spec: MergeSpec, name: str, version: str,
                   description: str = "") -> Manifest:
    """Resolve, merge and push: the new version's manifest."""
    from hub.basemodel import architecture_fingerprint
    from hub.merge import check_same_base, merge  # torch: imported when a merge runs, not when `hub` starts

    parents = [registry.resolve(ref) for ref in refs]
    bases = sorted({m.base_model.id for m in parents if m.base_model.id is not None})
    fingerprints: dict[str | None, str] = {base: architecture_fingerprint(base) or base for base in bases}
    check_same_base({m.ref: fingerprints.get(m.base_model.id) for m in parents})
    adapters = [registry.read(m) for m in parents]
    merged = merge(adapters, spec)
    checked = spec.checked(merged.technique, len(parents))  # the lineage records defaults as applied
    with tempfile.TemporaryDirectory(prefix="hub-merge-") as tmp:
        folder = write_adapter(merged, Path(tmp) / "merged")
        return registry.push(folder, name, version, base_model=next(iter(bases), None),
                             description=description, lineage=merge_lineage(parents, checked))


def export_merged_version(registry: Registry, ref: str, base_model: str | None, out: Path,
                          dtype: str | None = None) -> Path:
    """`hub export REF --merged`: fold a version into its base (default: the base it was pushed for),
    saved in `dtype` (a torch dtype name; default: the base's own)."""
    import torch

    from hub import basemodel
    from hub.merge_base import export_merged

    manifest = registry.resolve(ref)
    adapter = registry.read(manifest)
    base = base_model or manifest.base_model.id or adapter.config.get("base_model_name_or_path")
    if not base:
        raise MergeError(f"{manifest.ref} records no base model: give --base-model")
    return export_merged(adapter, basemodel.embedded_name(base), out, dtype=getattr(torch, dtype) if dtype else None)


def merge_command(
    refs: list[str] = typer.Argument(..., help="Versions to merge (name, name@1.2.0, name@tag)."),
    method: str = typer.Option(..., "--method", help=f"LoRA: {', '.join(LORA_METHODS)}; IA3, BitFit, "
                               "bottleneck: linear; prompt tuning: cat."),
    weights: str | None = typer.Option(None, "--weights", help="Comma-separated, one per adapter (default 1 each); "
                                       "negative subtracts a task. Use --weights=-1,1 when the first is negative."),
    density: float | None = typer.Option(None, "--density", help="ties/dare/magnitude_prune: fraction kept."),
    majority_sign: str | None = typer.Option(None, "--majority-sign", help="ties forms: total (default) or frequency."),
    svd_rank: int | None = typer.Option(None, "--svd-rank", min=1, help="svd forms: rank of the result."),
    svd_clamp: float | None = typer.Option(None, "--svd-clamp", help="svd forms: clamp the factors at this quantile."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="dare forms: seed of the random pruning (default 0)."),
    name: str = typer.Option(..., "--name", help="Name of the merged adapter."),
    version: str = typer.Option(..., "--version", help="Its version."),
    description: str = typer.Option("", "--description", help="One line for `hub show`."),
    registry: Path | None = typer.Option(None, "--registry", help="Registry folder (default: $HUB_HOME)."),
) -> None:
    """Merge adapters into a new registry version; its manifest records parents, method and parameters."""
    try:
        spec = MergeSpec(method, parse_weights(weights), density, majority_sign, svd_rank, svd_clamp, seed)
        manifest = merge_versions(open_registry(registry), refs, spec, name, version, description)
    except (HubError, ArtifactError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"merged {' + '.join(m['ref'] for m in manifest.lineage['merge']['parents'])} -> {manifest.ref} "
               f"({manifest.technique}, {method}) sha256:{manifest.sha256[:12]}")


def register(app: typer.Typer) -> None:
    """Mount `hub merge` on the hub CLI."""
    app.command("merge")(merge_command)
