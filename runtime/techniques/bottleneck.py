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
decoder layer then adds r itself, so the op returns s - r. Each compile makes its own recording per
block (`compile_all`: one Tap shared by the TapOp and the BlockOp it compiles), read back within one
forward under the engine's lock: a batch's row segments (runtime/generate.py) each run their PRE ops
before the block's POST ops, and two segments with the same adapter never read each other's residual.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from hub.architectures import BOTTLENECK_MODEL_TYPES, BOTTLENECK_SITES
from hub.bottleneck_format import ACTIVATIONS, BottleneckConfig
from hub.artifact import Adapter, ArtifactError, Technique
from hub.checkpoint import check_fits, module_tensors
from runtime.techniques.base import BatchInfo, Resident, SiteOp, Stage, TechniqueImpl, Use, nbytes_of, to_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


@dataclass(eq=False)
class Tap:
    """The residual of one block in the forward in flight (written by TapOp, consumed by BlockOp). A resident's
    own Tap (Block.tap, at its tap site) only pairs its two sites; the recordings are made per compile."""

    x: torch.Tensor | None = None


@dataclass(eq=False)
class Block:
    """One adapter at one block of one layer, ready to run (scaling folded into the up projection)."""

    down_t: torch.Tensor  # (hidden, b)
    down_b: torch.Tensor  # (b,)
    up_t: torch.Tensor  # (b, hidden)
    up_b: torch.Tensor  # (hidden,)
    config: BottleneckConfig
    tap: Tap = field(default_factory=Tap)

    def f(self, x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        down = ACTIVATIONS[self.config.non_linearity](torch.addmm(self.down_b, x.flatten(0, -2), self.down_t))
        up = torch.addmm(self.up_b, down, self.up_t).view(x.shape)
        return up if weight == 1.0 else up * weight


def stack(blocks: list[tuple[Block, float]], h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AdapterHub Stack: the blocks in order; returns the block's new output (the residual included)."""
    s = h
    for block, weight in blocks:
        cfg = block.config
        if cfg.parallel:
            s = block.f(r, weight)
        else:
            x = s + r if cfg.original_ln_before else s
            s = block.f(x, weight) + (s if cfg.residual_before_ln else x)
    return _after(blocks[-1][0].config, s, h, r)


def average(blocks: list[tuple[Block, float]], h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AdapterHub Average (weights already normalised): sum(w_i out_i) / n, as that library computes it."""
    first = blocks[0][0].config
    if first.parallel:
        x = res = r
    else:
        x = h + r if first.original_ln_before else h
        res = h if first.residual_before_ln else x
    outs = [w * (b.f(x) if b.config.parallel else b.f(x) + res) for b, w in blocks]
    s = sum(outs[1:], outs[0]) / len(blocks)
    return _after(blocks[-1][0].config, s, h, r)


def _after(cfg: BottleneckConfig, s: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    if cfg.parallel:
        s = s + h
    return s + r if cfg.original_ln_after else s


class TapOp(SiteOp):
    """PRE op at a norm: records its input (the residual) and changes nothing."""

    stage = Stage.PRE

    def __init__(self, tap: Tap):
        self.tap = tap

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.tap.x = x
        return x


@dataclass(eq=False)
class RowGroup:
    """Rows of a batch that apply the same adapters with the same weights at one block."""

    rows: list[int]
    mode: str  # "stack" | "average"
    blocks: list[tuple[Block, float]]  # (adapter's block, its weight), in stack order


class BlockOp(SiteOp):
    """POST op at a block's output projection: each group of rows with the same adapters, in one go."""

    stage = Stage.POST

    def __init__(self, tap: Tap, groups: list[RowGroup]):
        self.tap = tap
        self.groups = groups
        self._index: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        assert y is not None, "a POST op is given the layer's output"
        r, self.tap.x = self.tap.x, None
        if r is None:
            raise RuntimeError("bottleneck adapter: the block's residual was not recorded (unsupported layer layout)")
        for n, group in enumerate(self.groups):
            idx = self._index.get(n)
            if idx is None:
                idx = self._index[n] = torch.tensor(group.rows, device=y.device)
            h, res = y.index_select(0, idx), r.index_select(0, idx)
            out = (stack if group.mode == "stack" else average)(group.blocks, h, res)
            y = y.index_copy(0, idx, out - res)  # the decoder layer adds the residual back
        return y


class Bottleneck(TechniqueImpl):
    technique = Technique.BOTTLENECK

    def load(self, key: str, adapter: Adapter, model: PreTrainedModel) -> Resident:
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
        sites: dict[str, object] = {}
        for layer, tensors in sorted(module_tensors(adapter).items()):
            by_location: dict[str, dict[str, torch.Tensor]] = {}
            for name, t in tensors.items():
                location, _, part = name.partition("_adapter.")
                if location not in config.locations or part not in _PARTS:
                    raise ArtifactError(f"{layer}: tensor {name!r} is not a projection at a location the config "
                                        f"enables ({', '.join(config.locations)})")
                by_location.setdefault(location, {})[part] = t
            for location, parts in by_location.items():
                sites.update(self._block_sites(layer, location, parts, config, modules, like))
        blocks = [b for b in sites.values() if isinstance(b, Block)]
        size = nbytes_of(t for b in blocks for t in (b.down_t, b.down_b, b.up_t, b.up_b))
        return Resident(key, self.technique, sites, size, adapter.config)

    @staticmethod
    def _block_sites(layer: str, location: str, parts: dict[str, torch.Tensor], config: BottleneckConfig,
                     modules: dict[str, nn.Module], like: torch.Tensor) -> dict[str, object]:
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
        block = Block(t["down.weight"].t().contiguous(), t["down.bias"], (t["up.weight"] * config.scaling).t()
                      .contiguous(), t["up.bias"] * config.scaling, config)
        return {tap_site: block.tap, out_site: block}

    def compile(self, site: str, uses: list[Use], batch: BatchInfo) -> list[SiteOp]:
        return self.compile_all({site: uses}, batch)[site]

    def compile_all(self, site_uses: dict[str, list[Use]], batch: BatchInfo) -> dict[str, list[SiteOp]]:
        """Per site its op; a block's TapOp and BlockOp share a recording made here, not the resident's."""
        recordings: dict[int, Tap] = {}  # id of the resident's Tap -> this compile's

        def recording(tap: Tap) -> Tap:
            return recordings.setdefault(id(tap), Tap())

        return {site: self._compile_site(site, uses, batch, recording) for site, uses in site_uses.items()}

    @staticmethod
    def _compile_site(site: str, uses: list[Use], batch: BatchInfo, recording: Callable[[Tap], Tap]) -> list[SiteOp]:
        # Every resident with a block here has its tap site too, so both sites see these same uses.
        first = uses[0].resident.sites[site]
        if isinstance(first, Tap):
            return [TapOp(recording(first))]
        by_row: dict[int, list[Use]] = {}
        for use in uses:
            by_row.setdefault(use.row, []).append(use)
        groups: dict[tuple, RowGroup] = {}
        for row, row_uses in by_row.items():
            mode = batch.mode[row]
            weights = [u.weight for u in row_uses]
            if mode == "average":
                total = sum(weights)
                weights = [w / total for w in weights]
            program = (mode, tuple((u.resident.key, w) for u, w in zip(row_uses, weights)))
            group = groups.setdefault(program, RowGroup([], mode, [(u.resident.sites[site], w)
                                                                    for u, w in zip(row_uses, weights)]))
            group.rows.append(row)
        return [BlockOp(recording(first.tap), list(groups.values()))]

    def check_plan(self, uses_of_row: list[Use], mode: str) -> None:
        if mode != "average":
            return
        for site in {s for u in uses_of_row for s, p in u.resident.sites.items() if isinstance(p, Block)}:
            if sum(u.weight for u in uses_of_row if site in u.resident.sites) == 0:
                raise ValueError(f"average of bottleneck adapters at {site}: the weights of the adapters "
                                 "present there sum to 0")
