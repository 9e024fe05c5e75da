"""Bottleneck adapter layers (Houlsby / Pfeiffer / parallel), many per batch, per row.

The math is the AdapterHub `adapters` library's for pre-norm decoders (Llama, Mistral), where the
adapter layer replaces the block's `r + h` (r: the block's input, the residual; h: the attention or
feed-forward output) and no LayerNorm takes part. With f(x) = scaling * up(act(down(x))):

    sequential:  x = h + r if original_ln_before else h;  res = h if residual_before_ln else x
                 s = f(x) + res
    parallel:    s = f(r)                      then s += h
    after all:   s += r if original_ln_after

Composition per row (the library's Stack / Average, weights from the row's plan):
- stack:   the adapters run in order, each taking the previous one's s as its h; the last one's
           "after" step applies; a weight w scales that adapter's f (1.0 = the library's Stack).
- average: x and res come from the first adapter's rule, every adapter computes
           out_i = f_i(x) + res (parallel ones: f_i(x)), then s = sum(w_i out_i) / n with weights
           normalised to 1, and the last adapter's "after" step applies. This is the library's
           `Average` exactly, including its division by n of the weighted sum (so the residual share
           shrinks: Average(a, a) is not a).
At a location some of a row's adapters lack (a Pfeiffer adapter has none after attention, or
`leave_out`), only the present ones compose there; average weights are renormalised over them.

Hooks (hub/architectures.py), without engine changes: the block outputs are the outputs of `self_attn.o_proj` and
`mlp.down_proj` (POST ops there; any LoRA delta on them applies first), and the residuals are the
inputs of `input_layernorm` and `post_attention_layernorm` (PRE ops there record them). The
decoder layer then adds r itself, so the op returns s - r. Each batch's ops make their own recording per block
(a `Recording` shared by the block's TapOp and BlockOp), read back within one forward under the engine's lock.

Slots: an adapter's block at an output site lives in a slot of that site's buffer for its bottleneck size b
(runtime/techniques/slots.py), copied there once at load: down [b, hidden], its bias [b], up^T [b, hidden] and
its bias [hidden] with the scaling folded in. A batch compiles per output site one `BlockOp` over every row
with a block there: index tensors (row, slot, weight) per composition step and slot buffer, and per-row flags
of the rule each step applies. It runs f = up(act(down(x))) with the kernel seam (`lora_shrink` for down,
`gather_add` for the biases, `lora_expand` for up) reading each row's block in place, so a batch change
rebuilds index tensors and moves no adapter bytes. A stack runs step by step (step k: every row's k-th
adapter), an average in one step (its adapters' f summed by `lora_expand` with weights w_i / n). Rows without
a block at a site are in no entry: their output there is bit for bit the base's.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from hub.architectures import BOTTLENECK_MODEL_TYPES, BOTTLENECK_SITES
from hub.bottleneck_format import ACTIVATIONS, BottleneckConfig
from hub.artifact import Adapter, ArtifactError, Technique
from hub.checkpoint import check_fits, module_tensors
from runtime.techniques.base import BatchInfo, Resident, SiteOp, Stage, TechniqueImpl, Use, to_device
from runtime.techniques.slots import Padding, PerToken, Slot, SlotBuffer, bucket, place

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


@dataclass(eq=False)
class Tap:
    """A resident's payload at a block's tap site (a norm): the output site whose block takes its input as the
    residual."""

    out: str


@dataclass(eq=False)
class BlockSlot(Slot):
    """One adapter's block at one output site: its slot (down, down bias, scaled up^T, scaled up bias) and config."""

    config: BottleneckConfig


BottleneckSite = Tap | BlockSlot  # a block's tap site records its residual, its output site runs it


class Recording:
    """The residual of one block in the forward in flight (written by TapOp, consumed by BlockOp)."""

    def __init__(self) -> None:
        # an attribute from the start: a graph's ops signature (runtime/graphs.py) reads the object's attributes,
        # so one made before the recording's first forward equals one made after it
        self.x: torch.Tensor | None = None


class TapOp(SiteOp):
    """PRE op at a norm: records its input (the residual) and changes nothing."""

    stage = Stage.PRE

    def __init__(self, recording: Recording):
        self.recording = recording

    def padded(self, padding: Padding) -> TapOp:
        return self  # no index tensors: it records the padded batch's residual as it does any

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.recording.x = x
        return x


_RULE = ("parallel", "original_ln_before", "residual_before_ln", "original_ln_after")


class _Made:
    """One batch's index tensors, made once per value list: sites with equal entries (every layer's blocks,
    typically) share them, so a batch change makes a few tensors, not a few per site."""

    def __init__(self, device: torch.device):
        self.device = device
        self.made: dict[tuple, torch.Tensor] = {}

    def __call__(self, values: Sequence, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (tuple(values), dtype)
        if key not in self.made:
            self.made[key] = torch.tensor(values, device=self.device, dtype=dtype)
        return self.made[key]


def _flags(configs: Sequence[BottleneckConfig], made: _Made) -> tuple[torch.Tensor, ...]:
    """Per entry, as bool tensors: parallel, original_ln_before, residual_before_ln, original_ln_after."""
    return tuple(made([getattr(c, name) for c in configs], torch.bool) for name in _RULE)


def _uniform(configs: Sequence[BottleneckConfig]) -> tuple[bool, ...] | None:
    """The rule flags (as `_flags` orders them) when every entry has the same, else None: then the op computes the
    rule directly instead of selecting per row."""
    rules = {tuple(bool(getattr(c, name)) for name in _RULE) for c in configs}
    return rules.pop() if len(rules) == 1 else None


def _inputs(flags: tuple[torch.Tensor, ...], s: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, res) per row by its adapter's rule: parallel x = res = r; else x = s + r if original_ln_before else s,
    res = s if residual_before_ln else x."""
    parallel, ln_before, residual_before_ln = (f[:, None] for f in flags[:3])
    x = torch.where(parallel, r, torch.where(ln_before, s + r, s))
    return x, torch.where(parallel, r, torch.where(residual_before_ln, s, x))


class _Group:
    """Entries (row, slot, weight) of one composition step that read one slot buffer with one activation; `rule`:
    their flags when all share them, `covers`: whether they are every row of their index space."""

    def __init__(self, ops: ModuleType, buffer: SlotBuffer, activation: str, entry: int,
                 rule: tuple[bool, ...] | None = None, covers: bool = False):
        self.ops = ops  # the kernel seam's backend (runtime/kernels), called directly
        self.buffer, self.activation, self.entry = buffer, activation, entry
        self.rule, self.covers = rule, covers

    def add_f(self, out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor,
              weights: torch.Tensor) -> None:
        """out[rows[u]] += weights[u] * f_u(x[rows[u]]), every block read in place from its slot."""
        down, down_b, up_t, up_b = self.buffer.parts
        h = self.ops.lora_shrink(x, down, rows, slots)
        self.ops.gather_add(h, down_b, torch.arange(h.shape[0], device=h.device), slots, torch.ones_like(weights))
        h = ACTIVATIONS[self.activation](h)
        self.ops.lora_expand(out, h, up_t.transpose(1, 2), rows, slots, weights)
        self.ops.gather_add(out, up_b, rows, slots, weights)


class BlockOp(SiteOp):
    """POST op at a block's output projection: every row with a block here, stack steps then averages.

    Index spaces: `touched` (batch rows with a block here) into the flattened output; stack entries and the
    average rows into the touched rows; average entries into the average rows. Each is expanded per token
    (`PerToken`) for a prefill."""

    stage = Stage.POST

    def __init__(self, recording: Recording, rows: int, touched: torch.Tensor, local: list[tuple[torch.Tensor, ...]],
                 steps: list[list[_Group]], average: tuple[int, list[_Group]] | None,
                 averaged: list[tuple[torch.Tensor, ...]], after: tuple[bool, ...] | None):
        self.recording = recording
        self.whole = touched.shape[0] == rows  # every row of the batch, in order: no gather, no scatter
        self.after = after  # the rows' last adapters' flags, when all share them
        self.touched = PerToken(rows, [(touched,)])
        self.local = PerToken(touched.shape[0], local)  # entry 0: every touched row's flags for the "after" step
        self.steps, self.average = steps, average
        self.averaged = PerToken(local[average[0]][0].shape[0] if average is not None else 1, averaged)

    def padded(self, padding: Padding) -> BlockOp:
        """Every index space padded: the average rows (a spare one where their entries need one), the touched
        rows (likewise, padding rows of the batch behind them) and the entries into each; padded entries have
        weight 0 and every flag off, and the op gathers and scatters (`whole` off): padding rows are garbage."""
        op = copy.copy(self)
        (touched,), = self.touched.get(self.touched.rows)
        local = self.local.get(self.local.rows)
        count = touched.shape[0]
        lengths = [bucket(entry[0].shape[0]) for entry in local]
        averaged: list[tuple[torch.Tensor, ...]] = []
        size = 1
        if self.average is not None:
            at = self.average[0]
            rows = local[at][0].shape[0]
            spare = any(bucket(e[0].shape[0]) != e[0].shape[0] for e in self.averaged.get(self.averaged.rows))
            size = lengths[at] = bucket(rows + spare)
            averaged = [padding.uses(e, (None, 0.0), space=(rows, size))
                        for e in self.averaged.get(self.averaged.rows)]
        spare = any(length != entry[0].shape[0] for length, entry in zip(lengths[1:], local[1:]))
        lengths[0] = bucket(count + spare)
        space = (count, lengths[0])
        op.touched = PerToken(padding.to, [(padding.pad(touched, lengths[0], space=(padding.rows, padding.to)),)])
        # entry 0 and the average rows' entry: rows, then weights and flags; a stack step's: rows, slots, then those
        plain = {0} | ({self.average[0]} if self.average is not None else set())
        op.local = PerToken(lengths[0], [padding.uses(entry, ((0.0,) if i in plain else (None,)) + (0.0,) *
                                                      (len(entry) - 2), space, length)
                                         for i, (entry, length) in enumerate(zip(local, lengths))])
        op.averaged = PerToken(size, averaged)
        op.whole = False
        return op

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None, "a POST op is given the layer's output"
        r_all, self.recording.x = self.recording.x, None
        if r_all is None:
            raise RuntimeError("bottleneck adapter: the block's residual was not recorded (unsupported layer layout)")
        if not y.is_contiguous():
            y = y.contiguous()
        flat_y, flat_r = y.view(-1, y.shape[-1]), r_all.reshape(-1, r_all.shape[-1])
        if self.whole:
            h, r = flat_y, flat_r
        else:
            (touched,), = self.touched.get(flat_y.shape[0])
            h, r = flat_y.index_select(0, touched), flat_r.index_select(0, touched)
        local = self.local.get(h.shape[0])
        s = h.clone()
        for step in self.steps:  # a stack: each row's k-th adapter takes the previous one's s as its h
            for group in step:
                rows, slots, weights, *flags = local[group.entry]
                if group.covers and group.rule is not None:  # every row, one rule: computed on s directly
                    parallel, ln_before, residual_before_ln, _ = group.rule
                    if parallel:
                        x_s, out = r, torch.zeros_like(s)
                    else:  # out may be s itself: add_f reads its input before it writes out
                        x_s = s + r if ln_before else s
                        out = s if residual_before_ln else x_s
                    group.add_f(out, x_s, rows, slots, weights)
                    s = out
                    continue
                s_g, r_g = s.index_select(0, rows), r.index_select(0, rows)
                x_g, res = _inputs(tuple(flags), s_g, r_g)
                out = res.masked_fill(flags[0][:, None], 0)  # a parallel adapter's s is f(r) alone
                group.add_f(out, x_g, torch.arange(out.shape[0], device=out.device), slots, weights)
                s.index_copy_(0, rows, out)
        if self.average is not None:  # x and res by the first adapter's rule, s = sum_i (w_i / n) out_i
            entry, groups = self.average
            rows, share, *flags = local[entry]
            s_a, r_a = s.index_select(0, rows), r.index_select(0, rows)
            x_a, res = _inputs(tuple(flags), s_a, r_a)
            out = res * share[:, None].to(res.dtype)  # the residual's share: sum of the sequential ones' w_i / n
            averaged = self.averaged.get(out.shape[0])
            for group in groups:
                group.add_f(out, x_a, *averaged[group.entry])
            s.index_copy_(0, rows, out)
        # the "after" step, by each row's last adapter
        if self.after is not None:
            s = s + h if self.after[0] else s
            s = s + r if self.after[3] else s
        else:
            _, last_parallel, last_ln_after = local[0]
            s = torch.where(last_parallel[:, None], s + h, s)
            s = torch.where(last_ln_after[:, None], s + r, s)
        if self.whole:  # the decoder layer adds the residual back
            return (s - r).view(y.shape)
        flat_y.index_copy_(0, touched, s - r)
        return y


class Bottleneck(TechniqueImpl[BottleneckSite]):
    technique = Technique.BOTTLENECK

    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident[BottleneckSite]:
        config = BottleneckConfig.from_dict(adapter.config)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in BOTTLENECK_MODEL_TYPES:
            raise ArtifactError(f"bottleneck adapters are served on {', '.join(BOTTLENECK_MODEL_TYPES)} bases, "
                                f"not {model_type!r} (its decoder layer places norms differently)")
        check_fits(adapter, model)
        if config.hidden_size is not None and config.hidden_size != model.config.hidden_size:
            raise ArtifactError(f"bottleneck adapter hidden_size {config.hidden_size} != base hidden size "
                                f"{model.config.hidden_size}")
        modules = dict(model.named_modules())
        like = next(model.parameters())
        blocks: dict[str, tuple[tuple[torch.Tensor, ...], str]] = {}  # output site -> (its slot's tensors, tap site)
        for layer, tensors in sorted(module_tensors(adapter).items()):
            by_location: dict[str, dict[str, torch.Tensor]] = {}
            for name, t in tensors.items():
                location, _, part = name.partition("_adapter.")
                if location not in config.locations or part not in _PARTS:
                    raise ArtifactError(f"{layer}: tensor {name!r} is not a projection at a location the config "
                                        f"enables ({', '.join(config.locations)})")
                by_location.setdefault(location, {})[part] = t
            for location, parts in by_location.items():
                out_site, tap_site, block = self._block(layer, location, parts, config, modules, like)
                blocks[out_site] = (block, tap_site)
        resident: Resident[BottleneckSite] = place(
            key, self.technique, model, {site: [block] for site, (block, _) in blocks.items()}, adapter.config,
            lambda site, slots: BlockSlot(slots[0].buffer, slots[0].slot, config))
        for out_site, (_, tap_site) in blocks.items():
            resident.sites[tap_site] = Tap(out_site)
        return resident

    @staticmethod
    def _block(layer: str, location: str, parts: dict[str, torch.Tensor], config: BottleneckConfig,
               modules: dict[str, nn.Module], like: torch.Tensor) -> tuple[str, str, tuple[torch.Tensor, ...]]:
        """(output site, tap site, the block's slot tensors: down [b, hidden], down bias, scaled up^T [b, hidden],
        scaled up bias), the tensors checked against the config and the model."""
        missing = [p for p in _PARTS if p not in parts]
        if missing:
            raise ArtifactError(f"{layer}: {location} adapter lacks {', '.join(missing)}")
        if parts["down.weight"].dim() != 2:
            raise ArtifactError(f"{layer}: {location}_adapter.down.weight has shape "
                                f"{tuple(parts['down.weight'].shape)}, expected (b, hidden)")
        b, hidden = parts["down.weight"].shape
        size = config.bottleneck_size
        want = size.get(layer.rsplit(".", 1)[-1]) if isinstance(size, dict) else size
        if want is not None and want != b:
            raise ArtifactError(f"{layer}: {location} adapter has bottleneck size {b}, the config says {want}")
        shapes = {"down.bias": (b,), "up.weight": (hidden, b), "up.bias": (hidden,)}
        for part, shape in shapes.items():
            if tuple(parts[part].shape) != shape:
                raise ArtifactError(f"{layer}: {location}_adapter.{part} has shape {tuple(parts[part].shape)}, "
                                    f"expected {shape}")
        tap_site, out_site = (f"{layer}.{name}" for name in BOTTLENECK_SITES[location])
        for site in (tap_site, out_site):
            if site not in modules:
                raise ArtifactError(f"{site!r} does not exist in the base model: no place for the {location} adapter")
        t = to_device(parts, like)
        return out_site, tap_site, (t["down.weight"], t["down.bias"], (t["up.weight"] * config.scaling).t(),
                                    t["up.bias"] * config.scaling)

    def compile_batch(self, site_uses: dict[str, list[Use[BottleneckSite]]], batch: BatchInfo
                      ) -> dict[str, list[SiteOp]]:
        """Per site its op; a block's TapOp and BlockOp share a recording made here, one per output site."""
        recordings: dict[str, Recording] = {}
        made = _Made(batch.device)
        ops: dict[str, list[SiteOp]] = {}
        for site, uses in site_uses.items():
            # every resident with a block at an output site has its tap site too, so both see these same uses
            first = uses[0].resident.sites[site]
            if isinstance(first, Tap):
                ops[site] = [TapOp(recordings.setdefault(first.out, Recording()))]
            else:
                ops[site] = [_block_op(recordings.setdefault(site, Recording()), site, uses, batch, made)]
        return ops

    def check_plan(self, uses_of_row: list[Use[BottleneckSite]], mode: str) -> None:
        if mode != "average":
            return
        for site in {s for u in uses_of_row for s, p in u.resident.sites.items() if isinstance(p, BlockSlot)}:
            if sum(u.weight for u in uses_of_row if site in u.resident.sites) == 0:
                raise ValueError(f"average of bottleneck adapters at {site}: the weights of the adapters "
                                 "present there sum to 0")


def _block_at(use: Use[BottleneckSite], site: str) -> BlockSlot:
    """The resident's block at an output site (the model's layout makes a site a tap site or an output site for
    every resident alike)."""
    block = use.resident.sites[site]
    assert isinstance(block, BlockSlot), f"{site} is a tap site"
    return block


def _block_op(recording: Recording, site: str, uses: list[Use[BottleneckSite]], batch: BatchInfo,
              made: _Made) -> BlockOp:
    """The index tensors of `uses` (every row's blocks at the output site `site`, in stack order) and their op."""
    by_row: dict[int, list[tuple[BlockSlot, float]]] = {}
    for use in uses:
        by_row.setdefault(use.row, []).append((_block_at(use, site), use.weight))
    touched = sorted(by_row)
    last = [by_row[row][-1][0].config for row in touched]
    flags = _flags(last, made)
    local: list[tuple[torch.Tensor, ...]] = [(made(range(len(touched))), flags[0], flags[3])]
    # (step, buffer, activation) -> entries (slot, local row, weight, config); step -1: the average rows
    groups: dict[tuple[int, int, str], tuple[SlotBuffer, list[tuple[int, int, float, BottleneckConfig]]]] = {}
    average_rows: list[tuple[int, float, BottleneckConfig]] = []  # (local row, residual share, first config)
    for n, row in enumerate(touched):
        blocks = by_row[row]
        if batch.mode[row] == "average":
            total, count = sum(w for _, w in blocks), len(blocks)
            at = len(average_rows)
            share = sum(w for b, w in blocks if not b.config.parallel) / total / count
            average_rows.append((n, share, blocks[0][0].config))
            for block, weight in blocks:
                key = (-1, id(block.buffer), block.config.non_linearity)
                groups.setdefault(key, (block.buffer, []))[1].append((block.slot, at, weight / total / count,
                                                                      block.config))
        else:
            for k, (block, weight) in enumerate(blocks):
                key = (k, id(block.buffer), block.config.non_linearity)
                groups.setdefault(key, (block.buffer, []))[1].append((block.slot, n, weight, block.config))
    steps: list[list[_Group]] = []
    average_groups: list[_Group] = []
    averaged: list[tuple[torch.Tensor, ...]] = []
    for (k, _, activation), (buffer, entries) in sorted(groups.items(), key=lambda item: item[0][0]):
        entries.sort(key=lambda e: (e[0], e[1]))  # by (slot, row): a run of one slot is one segment
        slots, rows = (made(v) for v in list(zip(*entries))[:2])
        weights = made([e[2] for e in entries], torch.float32)
        if k < 0:
            average_groups.append(_Group(batch.kernels, buffer, activation, len(averaged)))
            averaged.append((rows, slots, weights))
            continue
        while len(steps) <= k:
            steps.append([])
        configs = [e[3] for e in entries]
        steps[k].append(_Group(batch.kernels, buffer, activation, len(local), _uniform(configs),
                               len(entries) == len(touched)))
        local.append((rows, slots, weights, *_flags(configs, made)[:3]))
    average = None
    if average_rows:
        at_rows, shares, firsts = zip(*average_rows)
        average = (len(local), average_groups)
        local.append((made(at_rows), made(shares, torch.float32), *_flags(firsts, made)[:3]))
    return BlockOp(recording, batch.rows, made(touched), local, steps, average, averaged,
                   _uniform(last))
