"""Adapter artifacts on disk: which technique a folder holds, and reading it back as tensors.

One artifact folder = one adapter version:
- LoRA, IA3, prompt tuning: PEFT's own format (`adapter_config.json` with `peft_type`, and
  `adapter_model.safetensors`), so PEFT-trained adapters are served as they are and every
  artifact loads back into PEFT.
- BitFit and bottleneck adapters have no PEFT format; ours (documented in README) is the same
  two files, with `adapter_type` instead of `peft_type` in the config:
  - BitFit: `{"adapter_type": "bitfit", "target_modules": [...]}`; tensor key
    `<module path in the base model>.bias` (shape: out_features) holds the delta added to that
    module's output (modules without a bias get one).
  - bottleneck: `{"adapter_type": "bottleneck", ...}`; tensor keys
    `model.layers.<i>.<location>_adapter.{down,up}.{weight,bias}` (see runtime/techniques/bottleneck.py).

Options the runtime cannot serve are refused here, by name, so no weight is ever silently dropped.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hub import patterns
from hub.files import open_regular

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class ArtifactError(ValueError):
    """An adapter folder is missing, malformed, or holds something we cannot serve."""


class Technique(str, Enum):
    LORA = "lora"
    IA3 = "ia3"
    PROMPT_TUNING = "prompt_tuning"
    BITFIT = "bitfit"
    BOTTLENECK = "bottleneck"


PEFT_TYPES = {"LORA": Technique.LORA, "IA3": Technique.IA3, "PROMPT_TUNING": Technique.PROMPT_TUNING}
OWN_TYPES = {Technique.BITFIT.value: Technique.BITFIT, Technique.BOTTLENECK.value: Technique.BOTTLENECK}

# PEFT options that change the math in ways the runtime does not implement: refuse, never ignore.
_UNSUPPORTED_TRUE = ("use_dora", "use_qalora", "use_bdlora")
_UNSUPPORTED_SET = ("modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters",
                    "alora_invocation_tokens")


@dataclass
class Adapter:
    """An adapter read from disk: its technique, its config as saved, and its tensors by key."""

    technique: Technique
    config: dict[str, Any]
    tensors: dict[str, Any] = field(repr=False)  # str -> torch.Tensor, or TensorInfo (read with shapes_only)

    @property
    def num_parameters(self) -> int:
        return sum(int(t.numel()) for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in self.tensors.values())


MAX_RANK = 65536  # a LoRA rank past this is a mistake or an attack (PEFT's largest common ranks are 256-1024)
# Weight dtypes the runtime serves; an integer, bool or float8 tensor would be cast silently or fail only at serve time.
SERVED_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Config keys PEFT reads as regular expressions when they are strings (lists are matched by name suffix).
_PATTERN_KEYS = ("target_modules", "exclude_modules", "feedforward_modules", "layers_pattern")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_RANK


def check_config(technique: Technique, config: dict[str, Any], where: str) -> None:
    """Refuse (ArtifactError naming the key) hyper-parameters the runtime would fail on or misread only at
    serve time, and regular expressions that are malformed or not matched in bounded time (hub/patterns.py)."""
    def bad(key: str, why: str) -> ArtifactError:
        return ArtifactError(f"{where}: {key}={config[key]!r} {why}")

    for key in _PATTERN_KEYS:
        values = config.get(key)
        for value in [values] if isinstance(values, str) else values if isinstance(values, list) else []:
            if not isinstance(value, str):
                raise bad(key, "holds a non-string")
            if isinstance(values, str) or key == "layers_pattern":
                try:
                    patterns.check(value)
                except patterns.PatternError as e:
                    raise bad(key, f"is refused as a regular expression: {e}") from None
    if technique is not Technique.LORA:
        return
    if "r" in config and not _is_rank(config["r"]):
        raise bad("r", f"is not a whole number from 1 to {MAX_RANK}")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise bad("lora_alpha", "is not a finite number")
    for key, valid, what in (("rank_pattern", _is_rank, f"a whole number from 1 to {MAX_RANK}"),
                             ("alpha_pattern", _is_number, "a finite number")):
        table = config.get(key) or {}
        if not isinstance(table, dict):
            raise bad(key, "is not a map of module pattern -> value")
        for pattern, value in table.items():
            if not valid(value):
                raise ArtifactError(f"{where}: {key}[{pattern!r}]={value!r} is not {what}")
            try:
                patterns.check_key(pattern)
            except patterns.PatternError as e:
                raise ArtifactError(f"{where}: {key} key {pattern!r} is refused as a regular expression: {e}") from None


def check_tensors(tensors: dict[str, Any], where: str) -> None:
    """Refuse a tensor of a dtype the runtime does not serve, or holding NaN or inf (one such value in one
    row's adapter must never reach the batch it shares)."""
    for key, tensor in tensors.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in SERVED_DTYPES:
            raise ArtifactError(f"{where}: tensor {key!r} is {dtype}; adapter weights must be one of "
                                f"{', '.join(SERVED_DTYPES)}")
    bad = _non_finite(tensors)
    if bad is not None:
        raise ArtifactError(f"{where}: tensor {bad!r} holds non-finite values (NaN or inf)")


def _non_finite(tensors: dict[str, Any]) -> str | None:
    """The first key (in order) whose tensor holds NaN or inf, else None. Torch tensors that lie back to back in
    one storage, as `parse_tensors` views a file's tensors of one dtype, are checked as one span: one call for the
    run instead of one per tensor (a LoRA on every layer's q,v has over a hundred), and a span covers exactly its
    tensors' elements, so nothing else is read and nothing is left out."""
    runs: dict[tuple, list[tuple[int, int, str, Any]]] = {}  # (storage, dtype) -> (offset, numel, key, tensor)
    bad: list[str] = []
    for key, tensor in tensors.items():
        if isinstance(tensor, TensorInfo):
            if not tensor.finite():
                bad.append(key)
        elif tensor.numel() and tensor.is_contiguous():
            storage = tensor.untyped_storage()  # views of one memory: a span over it stays inside each
            place = (storage.data_ptr(), storage.nbytes(), tensor.dtype, tensor.device)
            runs.setdefault(place, []).append((tensor.storage_offset(), tensor.numel(), key, tensor))
        elif tensor.numel() and not _finite(tensor):
            bad.append(key)
    for entries in runs.values():
        entries.sort(key=lambda e: e[0])
        run = entries[:1]
        for entry in entries[1:] + [None]:  # None ends the last run
            if entry is not None and entry[0] == run[-1][0] + run[-1][1]:
                run.append(entry)
                continue
            first, total = run[0], sum(e[1] for e in run)
            if not _finite(first[3].as_strided((total,), (1,), first[0])):
                bad.extend(e[2] for e in run if not _finite(e[3]))
            run = [entry] if entry is not None else []
    if not bad:
        return None
    order = {key: i for i, key in enumerate(tensors)}
    return min(bad, key=order.__getitem__)


def _finite(tensor: Any) -> bool:
    """No NaN or inf among a float tensor's values. A sum holding a NaN or an inf is not finite (inf + -inf is
    NaN, NaN stays NaN), so a finite sum settles it at the cost of one read (`isfinite` takes several passes
    and a mask, 30 times the time); only a sum that is not finite, a non-finite value or an overflow, takes
    the exact check."""
    import torch

    total = tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        raise ArtifactError(f"{folder}: no {CONFIG_FILE}")
    return parse_config(read_buffer(path), str(path))


def parse_config(data: bytes | bytearray, where: str) -> dict[str, Any]:
    """An adapter config from its file's bytes (`where` names the file in errors)."""
    try:
        config = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where}: malformed JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(f"{where}: malformed JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{where}: expected a JSON object")
    return config


def is_adapterhub_folder(folder: str | Path) -> bool:
    """Does `folder` look like the AdapterHub `adapters` library's `model.save_adapter` output (its config nests
    the adapter config)? Such a folder is converted (hub/adapterhub_import.py, which loads torch) before a push."""
    folder = Path(folder)
    try:
        config = read_config(folder)
    except ArtifactError:
        return False
    return isinstance(config.get("config"), (dict, str)) and "peft_type" not in config \
        and "adapter_type" not in config and "hidden_size" in config


def technique_of(config: dict[str, Any]) -> Technique:
    """The technique an adapter config describes; refuses unknown types and unsupported options."""
    if "peft_type" in config:
        peft_type = str(config["peft_type"]).upper()
        if peft_type not in PEFT_TYPES:
            raise ArtifactError(
                f"PEFT type {config['peft_type']!r} is not served (served: {', '.join(PEFT_TYPES)}, "
                "plus bitfit and bottleneck)"
            )
        for key in _UNSUPPORTED_TRUE:
            if config.get(key):
                raise ArtifactError(f"PEFT option {key}=true is not served (its weights would be ignored)")
        for key in _UNSUPPORTED_SET:
            if config.get(key):
                raise ArtifactError(f"PEFT option {key}={config[key]!r} is not served (its weights would be ignored)")
        if peft_type == "LORA" and config.get("bias", "none") != "none":
            raise ArtifactError(f"LoRA bias={config['bias']!r} is not served (its trained biases would be ignored)")
        return PEFT_TYPES[peft_type]
    kind = config.get("adapter_type")
    if kind in OWN_TYPES:
        return OWN_TYPES[kind]
    raise ArtifactError(
        f"unknown adapter config: neither 'peft_type' nor a known 'adapter_type' "
        f"({', '.join(OWN_TYPES)}); an AdapterHub `adapters` library folder must be imported first"
    )


def read_tensors(path: Path) -> dict[str, Any]:
    """Load a safetensors file, turning truncation or corruption into one clear error."""
    return parse_tensors(_read_weights(path), str(path))


def _read_weights(path: Path) -> bytearray:
    if not path.exists() and not path.is_symlink():
        raise ArtifactError(f"{path.parent}: no {path.name}")
    try:
        return read_buffer(Path(path))
    except OSError as e:
        raise ArtifactError(f"{path}: cannot be read ({e})") from None


def read_buffer(path: Path, limit: int | None = None) -> bytearray:
    """A regular file's bytes in one writable buffer, so `parse_tensors` can view tensors in it without copies;
    with `limit`, at most limit + 1 bytes (enough for the caller's size check to see a file that is too long)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        size = size if limit is None else min(size, limit + 1)
        buf = bytearray(size)
        got = f.readinto(buf)
        # the file grew since fstat: keep every byte (up to the limit; the caller's size check sees them)
        rest = f.read() if limit is None else f.read(max(0, limit + 1 - got))
    return buf[:got] + rest if got != size or rest else buf


# safetensors dtype names -> (torch dtype name, bytes per element)
# (https://github.com/huggingface/safetensors, format section)
_DTYPES = {"BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
           "F16": ("float16", 2), "BF16": ("bfloat16", 2), "I32": ("int32", 4), "U32": ("uint32", 4),
           "F32": ("float32", 4), "F64": ("float64", 8), "I64": ("int64", 8), "U64": ("uint64", 8),
           "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}
_ITEMSIZE = dict(_DTYPES.values())
# A served float dtype -> (bytes a value, its exponent's bits in its top byte, in the byte below): a value whose
# exponent bits are all set is inf or NaN in each of these formats (little-endian, as safetensors stores them).
_EXPONENT = {"float16": (2, 0x7C, 0x00), "bfloat16": (2, 0x7F, 0x80), "float32": (4, 0x7F, 0x80),
             "float64": (8, 0x7F, 0xF0)}
# mask -> a bytes.translate table giving 1 for a byte with all of the mask's bits set, else 0
_ALL_SET = {mask: bytes(int(b & mask == mask) for b in range(256)) for mask in {0x7C, 0x7F, 0x80, 0xF0}}


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its safetensors header describes it, over its bytes, not loaded: what the registry's checks
    read (dtype, shape, finite values), so `hub push` and `hub pull` never import torch."""

    dtype: str  # torch's name for it, e.g. "float32"
    shape: tuple[int, ...]
    data: memoryview = field(repr=False, compare=False)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return _ITEMSIZE[self.dtype]

    def finite(self) -> bool:
        """No NaN or inf among the values (a served float dtype). Read from the bytes at C speed without numpy
        (whose import was a third of a `hub pull`): one byte a value says whether its top byte holds all the
        exponent's bits there, another whether the byte below does, and both at once is inf or NaN."""
        size, high, low = _EXPONENT[self.dtype]
        top = bytes(self.data[size - 1::size]).translate(_ALL_SET[high])
        if not low or 1 not in top:  # (a finite tensor almost never holds a top byte of all ones)
            return 1 not in top
        below = bytes(self.data[size - 2::size]).translate(_ALL_SET[low])
        return not int.from_bytes(top, "little") & int.from_bytes(below, "little")


# Generous beside the largest real adapters (every expert of a large MoE model: tens of thousands of tensors),
# and a bound on the parsing one artifact can make a load do.
MAX_TENSORS = 100_000
MAX_HEADER = 16 << 20  # bytes of a safetensors header (~150 bytes a tensor)


def _whole(value: Any) -> int:
    """A header's shape or offset entry: a JSON integer (not a float such as 2.5, Infinity or NaN)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not a whole number")
    return value


def parse_tensors(data: bytes | bytearray, where: str) -> dict[str, Any]:
    """Tensors from a safetensors file's bytes, by key (sorted); any malformation is one clear error naming
    `where`.

    The tensors are views into `data` (no copy: a cold load's time went mostly to fresh memory for
    copies), except a run of them (`_runs`) starting at an offset not aligned to its element size, which is
    copied. A read-only
    `data` (bytes) is copied once into a writable buffer first, as torch.frombuffer wants one."""
    import torch

    buf = bytearray(data) if memoryview(data).readonly else data
    tensors = {}
    entries = _parse_header(buf, where)
    for run in _runs(entries):
        first = run[0][1]
        dtype, offset = getattr(torch, first[0].dtype), first[1]
        counts = [info.numel() for _, (info, _) in run]
        if offset % dtype.itemsize:  # unaligned: kernels may assume alignment, so copy the run
            size = sum(counts) * dtype.itemsize
            flat = torch.frombuffer(bytearray(memoryview(buf)[offset:offset + size]), dtype=dtype)
        else:
            flat = torch.frombuffer(buf, dtype=dtype, count=sum(counts), offset=offset)
        for (key, (info, _)), part in zip(run, flat.split(counts)):
            tensors[key] = part.view(info.shape)
    for key, (info, _) in entries.items():
        if info.numel() == 0:
            tensors[key] = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
    return dict(sorted(tensors.items()))


def _runs(entries: dict[str, tuple[TensorInfo, int]]) -> list[list[tuple[str, tuple[TensorInfo, int]]]]:
    """The non-empty tensors in file order, grouped into runs of one dtype lying back to back: each run is one
    view of the buffer (one call, not one per tensor) that its tensors split, and they share its storage, so
    `check_tensors` checks a run's values at once."""
    runs: list[list[tuple[str, tuple[TensorInfo, int]]]] = []
    end = -1
    for key, (info, offset) in sorted(entries.items(), key=lambda e: e[1][1]):
        if info.numel() == 0:
            continue
        if runs and offset == end and info.dtype == runs[-1][0][1][0].dtype:
            runs[-1].append((key, (info, offset)))
        else:
            runs.append([(key, (info, offset))])
        end = offset + len(info.data)
    return runs


def parse_tensor_infos(data: bytes | bytearray, where: str) -> dict[str, TensorInfo]:
    """`parse_tensors` without torch: each tensor's dtype and shape over its bytes, by key (sorted), after the
    same checks of the file, with the same errors."""
    return {key: info for key, (info, _) in _parse_header(data, where).items()}


def _parse_header(data: bytes | bytearray, where: str) -> dict[str, tuple[TensorInfo, int]]:
    """Key -> (TensorInfo, the offset of its bytes in `data`), sorted by key, once the header and every
    tensor's place in the file are checked."""
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: not a valid safetensors file ({why})")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the header length field")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise bad(f"header of {header_len} bytes runs past the end of the file ({len(data)} bytes)")
    if header_len > MAX_HEADER:
        raise bad(f"header of {header_len} bytes, more than {MAX_HEADER}")
    try:
        header = json.loads(bytes(data[8:8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {e}") from None
    except RecursionError:
        raise bad("header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)  # optional; when there, a map of strings (as the library checks)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise bad(f"__metadata__ is not a map of strings: {metadata!r}")
    if len(header) > MAX_TENSORS:
        raise bad(f"{len(header)} tensors, more than {MAX_TENSORS}")
    view = memoryview(data)
    start, end = 8 + header_len, len(data)
    entries, spans = {}, []
    for key, info in header.items():
        try:
            dtype, itemsize = _DTYPES[info["dtype"]]
            shape = tuple(_whole(n) for n in info["shape"])
            first, last = (_whole(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"tensor {key!r}: malformed entry {info!r} ({type(e).__name__}: {e})") from None
        if min(shape, default=0) < 0 or not 0 <= first <= last or last - first != math.prod(shape) * itemsize:
            raise bad(f"tensor {key!r}: {info['dtype']} {list(shape)} does not match its data offsets "
                      f"{[first, last]}")
        if start + last > end:
            raise bad(f"tensor {key!r} ends at byte {start + last}, past the end of the file ({end} bytes; truncated?)")
        spans.append((first, last, key))
        entries[key] = (TensorInfo(dtype, shape, view[start + first:start + last]), start + first)
    covered = 0
    for first, last, key in sorted(spans):
        if first != covered:
            raise bad(f"tensor {key!r} starts at byte {first} of the data, expected {covered} (a gap or an overlap)")
        covered = last
    if covered != end - start:
        raise bad(f"the tensors cover {covered} bytes of data, the file holds {end - start}")
    return dict(sorted(entries.items()))


def read_adapter(folder: str | Path, *, shapes_only: bool = False) -> Adapter:
    """Read an artifact folder (PEFT format or ours) into an Adapter; with `shapes_only` its tensors are
    TensorInfo (every check made, torch never imported: what a push needs)."""
    folder = Path(folder)
    config = read_config(folder)
    technique = technique_of(config)
    weights = folder / WEIGHTS_FILE
    return _adapter(technique, config, _parse(_read_weights(weights), str(weights), shapes_only), weights)


def adapter_from_bytes(config: bytes | bytearray, weights: bytes | bytearray, where: str, *, shapes_only: bool = False) -> Adapter:
    """An Adapter from its two files' bytes (the registry reads stored files once, checks, parses); with
    `shapes_only`, as `read_adapter` takes it."""
    parsed = parse_config(config, f"{where}/{CONFIG_FILE}")
    technique = technique_of(parsed)
    path = f"{where}/{WEIGHTS_FILE}"
    return _adapter(technique, parsed, _parse(weights, path, shapes_only), path)


def _parse(data: bytes | bytearray, where: str, shapes_only: bool) -> dict[str, Any]:
    return parse_tensor_infos(data, where) if shapes_only else parse_tensors(data, where)


def _adapter(technique: Technique, config: dict[str, Any], tensors: dict[str, Any], weights: Path | str) -> Adapter:
    """Every check that needs no base model, so push, pull and load refuse the same artifacts."""
    from hub.checkpoint import check_structure  # checkpoint builds on this module

    check_config(technique, config, str(Path(weights).parent / CONFIG_FILE))
    if not tensors:
        raise ArtifactError(f"{weights}: holds no tensors")
    check_tensors(tensors, str(weights))
    adapter = Adapter(technique=technique, config=config, tensors=tensors)
    check_structure(adapter)
    return adapter


def write_adapter(adapter: Adapter, folder: Path) -> Path:
    """Save an Adapter as an artifact folder (config JSON + safetensors, as PEFT writes them)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    tensors = {k: t.detach().contiguous() for k, t in sorted(adapter.tensors.items())}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder
