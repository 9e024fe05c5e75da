"""`hub train`: fine-tune an adapter from a JSONL file, keep the best checkpoint, record how it was made.

The run writes OUT/adapter (the artifact), OUT/training.json (the record plus the loss curves) and,
where matplotlib is installed, OUT/loss_curve.png. With --push the adapter becomes NAME@VERSION in the
registry, its manifest lineage carrying the record under "train" (`hub show` prints it), so every
version says which data (sha256, rows), options, hyper-parameters, seed and libraries made it and with
what final losses.
"""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from hub.artifact import ArtifactError, Technique
from hub.basemodel import DEFAULT_BASE_MODEL, BaseModelError
from hub.clikit import finite
from hub.errors import HubError
from hub.registry import open_registry
from hub.remotes import Remotes

if TYPE_CHECKING:  # hub.train imports torch: loaded when a run starts, not when `hub` starts
    from hub.train import Chat, Example, Fit, TrainSpec

LIBRARIES = ("torch", "transformers", "peft", "safetensors", "adapterhub-serve")


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _layers(text: str | None) -> tuple[int, ...]:
    from hub.train import TrainError

    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise TrainError(f"--layers takes comma-separated layer indices, got {text!r}") from None


def split_rows(rows: list[Example | Chat], fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the rows (at least one) is held out."""
    import torch

    from hub.train import TrainError

    if not 0 < fraction < 1:
        raise TrainError(f"--eval-split must be between 0 and 1 (exclusive), got {fraction}")
    held = max(1, round(len(rows) * fraction))
    if held >= len(rows):
        raise TrainError(f"--eval-split {fraction} of {len(rows)} rows leaves no training row")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in sorted(order[held:])], [rows[i] for i in sorted(order[:held])]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version as package_version  # not on every `hub` start

    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = package_version(name)
        except PackageNotFoundError:
            continue
    return found


def training_record(spec: TrainSpec, base_id: str, data: dict[str, Any], validation: dict[str, Any] | None,
                    examples: int, max_len: int, fit: Fit, wall_s: float) -> dict[str, Any]:
    """The manifest's `lineage.train`: everything that made this adapter and how the run ended."""
    kept = fit.losses[max(0, fit.best_step - 10): fit.best_step]  # the steps up to the kept checkpoint
    val = dict(fit.val_losses).get(fit.best_step)
    return {
        "technique": spec.technique.value, "base_model": base_id,
        "data": {**data, "examples": examples}, "validation": validation,
        "options": spec.options(),
        "hyperparams": {"steps": spec.steps, "lr": spec.lr, "batch_size": spec.batch_size, "seed": spec.seed,
                        "max_len": max_len, "eval_every": spec.eval_every or max(1, spec.steps // 10)},
        "steps_done": len(fit.losses), "kept_step": fit.best_step, "interrupted": fit.interrupted,
        "final_train_loss": round(sum(kept) / len(kept), 6), "final_val_loss": None if val is None else round(val, 6),
        "wall_time_s": round(wall_s, 1), "libraries": library_versions(),
    }


def save_loss_curve(fit: Fit, path: Path) -> bool:
    """The loss curves as a PNG, if matplotlib is installed (it is no dependency of the hub)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(fit.losses) + 1), fit.losses, label="train", linewidth=1)
    if fit.val_losses:
        axes.plot(*zip(*fit.val_losses), marker="o", label="validation")
    axes.axvline(fit.best_step, color="grey", linestyle=":", label="kept")
    axes.set(xlabel="step", ylabel="loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def train_command(
    technique: str = typer.Option(..., "--technique", help="lora, ia3, prompt_tuning, bitfit or bottleneck."),
    data: Path = typer.Option(..., "--data", help='JSONL or a `datasets` save_to_disk folder: {"prompt", "completion"} or '
                                                      '{"messages": [...]} rows.'),
    eval_data: Path | None = typer.Option(None, "--eval-data", help="Validation JSONL (same formats)."),
    eval_split: float | None = typer.Option(None, "--eval-split", callback=finite,
                                            help="Hold out this fraction of --data instead."),
    name: str = typer.Option(..., "--name", help="Adapter name (optionally org/name)."),
    version: str = typer.Option(..., "--version", help="Its version, e.g. 1.0.0."),
    base_model: str = typer.Option(DEFAULT_BASE_MODEL, "--base-model", help="Embedded name, folder or HF id."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Optimizer steps (default 100)."),
    epochs: float | None = typer.Option(None, "--epochs", min=0.01, callback=finite,
                                        help="Passes over the data, instead of --steps."),
    lr: float = typer.Option(1e-3, "--lr", min=0, callback=finite,
                             help="AdamW learning rate (after a 10% linear warm-up)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per step (and per validation batch)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seeds initialisation, batches and --eval-split."),
    max_len: int = typer.Option(256, "--max-len", min=2, help="Longer examples are dropped (and counted)."),
    eval_every: int = typer.Option(0, "--eval-every", min=0, help="Steps between checkpoints (default: steps/10)."),
    r: int = typer.Option(8, "--r", min=1, help="LoRA rank."),
    alpha: int = typer.Option(16, "--alpha", min=1, help="LoRA alpha."),
    target_modules: str | None = typer.Option(None, "--target-modules", help="Comma-separated module names."),
    layers: str | None = typer.Option(None, "--layers", help="Comma-separated layer indices (default: all)."),
    num_virtual_tokens: int = typer.Option(8, "--num-virtual-tokens", min=1, help="Prompt tuning length."),
    config: str = typer.Option("pfeiffer", "--config", help="Bottleneck: pfeiffer or houlsby."),
    reduction_factor: int = typer.Option(16, "--reduction-factor", min=1, help="Bottleneck: hidden / size."),
    out: Path | None = typer.Option(None, "--out", help="New folder for the run (default: ./NAME-VERSION)."),
    push: bool = typer.Option(False, "--push", help="Add the adapter to the registry as NAME@VERSION."),
    to: str | None = typer.Option(None, "--to", help="With --push: also publish it to this remote (name, path, "
                                                     "file:// or hf://)."),
    description: str = typer.Option("", "--description", help="With --push: one line for `hub show`."),
    registry: Path | None = typer.Option(None, "--registry", help="Registry folder (default: $HUB_HOME)."),
) -> None:
    """Fine-tune an adapter on a JSONL file; saves the best checkpoint (Ctrl-C: the best so far, exit 130)."""
    from hub.train import TrainError

    try:
        run(locals())
    except (TrainError, HubError, ArtifactError, BaseModelError, OSError) as e:
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        raise typer.Exit(1) from None


def log(line: str) -> None:
    """Progress and notes go to stderr; stdout says what was made."""
    typer.echo(line, err=True)


def run(o: dict[str, Any]) -> None:
    """`hub train` with its options `o`: every input is checked before the base model loads."""
    from hub import basemodel
    from hub.manifest import check_name, check_version
    from hub.train import (TrainError, TrainSpec, bottleneck_preset, dataset_info, encode_chat, read_rows,
                           train_adapter)

    if o["technique"] not in {t.value for t in Technique}:
        known = ", ".join(t.value for t in Technique)
        raise TrainError(f"--technique must be one of {known}, got {o['technique']!r}")
    check_name(o["name"])
    check_version(o["version"])
    if o["eval_data"] is not None and o["eval_split"] is not None:
        raise TrainError("give --eval-data or --eval-split, not both")
    if o["steps"] is not None and o["epochs"] is not None:
        raise TrainError("give --steps or --epochs, not both")
    bottleneck_preset(o["config"])
    out = o["out"] or Path(f"{o['name'].replace('/', '--')}-{o['version']}")
    if out.exists():
        raise TrainError(f"{out} exists: give a new --out folder")
    registry = open_registry(o["registry"]) if o["push"] else None
    if registry is not None and registry.index().get(o["name"], o["version"]) is not None:
        raise TrainError(f"{o['name']}@{o['version']} is in the registry already")
    remote = None
    if o["to"] is not None:
        if registry is None:
            raise TrainError("--to publishes the pushed version: give --push too")
        remote = Remotes(registry.root).open(o["to"])  # a bad remote fails first
    rows = read_rows(o["data"])
    train_rows, val_rows = rows, []
    validation = None
    if o["eval_data"] is not None:
        val_rows = read_rows(o["eval_data"])
        validation = dataset_info(o["eval_data"], len(val_rows))
    elif o["eval_split"] is not None:
        train_rows, val_rows = split_rows(rows, o["eval_split"], o["seed"])
        validation = {"split": o["eval_split"], "rows": len(val_rows)}
    model, tokenizer = basemodel.load(o["base_model"])
    examples = encode_chat(tokenizer, train_rows, o["max_len"], log)
    val = encode_chat(tokenizer, val_rows, o["max_len"], log) if val_rows else []
    steps = o["steps"] or (math.ceil(o["epochs"] * len(examples) / o["batch_size"]) if o["epochs"] else 100)
    spec = TrainSpec(Technique(o["technique"]), steps=steps, lr=o["lr"], batch_size=o["batch_size"], seed=o["seed"],
                     target_modules=_csv(o["target_modules"]), layers=_layers(o["layers"]), r=o["r"],
                     lora_alpha=o["alpha"], num_virtual_tokens=o["num_virtual_tokens"], bottleneck_config=o["config"],
                     reduction_factor=o["reduction_factor"], eval_every=o["eval_every"])
    base_id = basemodel.canonical_id(o["base_model"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    result = train_adapter(model, examples, spec, out / "adapter", base_model_id=base_id, pad_id=pad_id, log=log,
                           val=val)
    record = training_record(spec, base_id, dataset_info(o["data"], len(rows)), validation, len(examples),
                             o["max_len"], result.fit, time.perf_counter() - started)
    curves = {"train_losses": result.fit.losses, "val_losses": result.fit.val_losses}
    (out / "training.json").write_text(json.dumps({**record, **curves}, indent=1) + "\n")
    if not save_loss_curve(result.fit, out / "loss_curve.png"):
        log("matplotlib is not installed: no loss_curve.png")
    typer.echo(f"trained {spec.technique.value} in {len(result.fit.losses)} steps: train loss "
               f"{record['final_train_loss']}, validation loss {record['final_val_loss']} "
               f"(step {result.fit.best_step}) "
               f"-> {out / 'adapter'}")
    if registry is not None:
        manifest = registry.push(out / "adapter", o["name"], o["version"], base_model=o["base_model"],
                                 description=o["description"], lineage={"train": record})
        typer.echo(f"pushed {manifest.ref} {manifest.technique} sha256:{manifest.sha256[:12]}")
        if remote is not None:
            typer.echo(f"published {manifest.ref} to {remote.publish(manifest, registry)}")
    if result.fit.interrupted:  # saved (and pushed) as asked; the exit status still says Ctrl-C stopped the run
        raise typer.Exit(130)


def register(app: typer.Typer) -> None:
    """Mount `hub train` on the hub CLI."""
    app.command("train")(train_command)
