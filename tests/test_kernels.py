"""The kernel seam (runtime/kernels): every backend against a per-use loop in float64, isolation of rows
and slots outside the uses, the refusals, the choice of backend and the fallback when the fused CPU kernels
cannot be built. The fused backend builds once per machine into the per-user cache (runtime/kernels/cpu.py).

Tolerances (relative to the largest magnitude in the result): float32 1e-5; float16 2e-3 and bfloat16 2e-2,
about four roundings of their 11- and 8-bit mantissas (inputs are rounded to the dtype before the oracle
sees them, so only the products' and the sums' roundings count).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from runtime import kernels
from runtime.kernels import cpu, reference, triton_ops

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


BACKENDS = ["reference", "cpu", "triton"]


class OnDevice:
    """A backend's ops run on `device`: inputs copied there, results (and in-place outputs) copied back."""

    def __init__(self, ops, device: str):
        self.ops, self.device = ops, device

    def lora_shrink(self, x, *args):
        return self.ops.lora_shrink(*(t.to(self.device) for t in (x, *args))).cpu()

    def _in_place(self, name, y, *args):
        out = y.to(self.device)
        getattr(self.ops, name)(out, *(t.to(self.device) for t in args))
        y.copy_(out.cpu())

    def lora_expand(self, y, *args):
        self._in_place("lora_expand", y, *args)

    def lora(self, x, y, *args):
        out = y.to(self.device)
        self.ops.lora(x.to(self.device), out, *(t.to(self.device) for t in args))
        y.copy_(out.cpu())

    def gather_add(self, y, *args):
        self._in_place("gather_add", y, *args)

    def gather_mul(self, y, *args):
        self._in_place("gather_mul", y, *args)


def load_backend(name: str):
    """The backend's ops, or a skip saying why this machine lacks it. Triton runs on a GPU where there is
    one, else in its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""
    if name == "reference":
        return reference
    if name == "triton":
        if triton_ops.triton is None:
            pytest.skip("triton is not installed (pip install '.[cuda]', or the Makefile's TRITON)")
        if triton_ops.available():
            return OnDevice(triton_ops, "cuda")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run here")
        return triton_ops
    module = cpu.load()
    if module is None:
        pytest.skip("the fused CPU kernels could not be built here (see the warning)")
    return module


@pytest.fixture(params=BACKENDS)
def backend(request):
    return load_backend(request.param)


# --- the oracle: one use at a time, in float64 ---

def oracle_shrink(x, a, rows, slots):
    h = torch.zeros(rows.shape[0], a.shape[1], dtype=torch.float64)
    for u, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist())):
        h[u] = a[slot].double() @ x[row].double()
    return h


def oracle_expand(y, h, b, rows, slots, scale):
    out = y.double()
    for u, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist())):
        out[row] += scale[u].double() * (b[slot].double() @ h[u].double())
    return out


def oracle_add(y, v, rows, slots, scale):
    out = y.double()
    for u, (row, slot) in enumerate(zip(rows.tolist(), slots.tolist())):
        out[row] += scale[u].double() * v[slot].double()
    return out


def oracle_mul(y, v, rows, slots):
    out = y.double()
    for row, slot in zip(rows.tolist(), slots.tolist()):
        out[row] *= v[slot].double()
    return out


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    atol = tol * max(1.0, want.abs().max().item()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=atol)


def uses(g: torch.Generator, tokens: int, n_slots: int, n_uses: int, order: str):
    """Random uses: rows repeat (stacks), slots sorted by (slot, row) ("runs") or as drawn ("scattered")."""
    rows = torch.randint(0, tokens, (n_uses,), generator=g)
    slots = torch.randint(0, n_slots, (n_uses,), generator=g)
    if order == "runs":
        perm = torch.argsort(slots * tokens + rows, stable=True)
        rows, slots = rows[perm], slots[perm]
    scale = torch.rand(n_uses, generator=g) * 4 - 2
    return rows, slots, scale


# (tokens, d_in, d_out, r, slots, uses): decode, stacked rows, rank 1 and 256, no uses, prefill-shaped runs,
# a width that is no multiple of a vector, one token
SHAPES = [(8, 64, 48, 8, 5, 8), (6, 40, 72, 4, 3, 15), (5, 24, 16, 1, 2, 9), (4, 32, 24, 256, 3, 6),
          (7, 16, 16, 8, 4, 0), (200, 64, 96, 16, 3, 260), (6, 1100, 1030, 4, 3, 10), (1, 8, 8, 2, 1, 1)]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32)]  # (activations, slots): a half model may keep float32 slots


def case(seed, shape, order, act, wt):
    tokens, d_in, d_out, r, n_slots, n_uses = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=g).to(act)
    y = torch.randn(tokens, d_out, generator=g).to(act)
    a = (torch.randn(n_slots, r, d_in, generator=g) / d_in ** 0.5).to(wt)
    b = (torch.randn(n_slots, d_out, r, generator=g) / r ** 0.5).to(wt)
    v = (torch.rand(n_slots, d_out, generator=g) + 0.5).to(wt)
    return x, y, a, b, v, *uses(g, tokens, n_slots, n_uses, order)


@pytest.mark.parametrize("order", ["runs", "scattered"])
@pytest.mark.parametrize("act,wt", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ops_equal_a_per_use_loop(backend, shape, act, wt, order):
    _, d_in, d_out, _, _, n_uses = shape
    if backend is triton_ops and not triton_ops.available() and (n_uses > 100 or d_in * d_out > 100_000):
        pytest.skip("Triton's interpreter runs one program at a time: shapes this large run on a GPU")
    x, y, a, b, v, rows, slots, scale = case(hash(shape) % 1000, shape, order, act, wt)
    h = backend.lora_shrink(x, a, rows, slots)
    assert h.dtype == torch.float32 and h.shape == (rows.shape[0], a.shape[1])
    close(h, oracle_shrink(x, a, rows, slots), act if wt == act else torch.float32)
    b_t = b.transpose(1, 2).contiguous().transpose(1, 2)  # the same B stored [S, r, d_out]: the engine's layout
    for op, want in [(lambda t: backend.lora_expand(t, h, b, rows, slots, scale),
                      oracle_expand(y, h, b, rows, slots, scale)),
                     (lambda t: backend.lora_expand(t, h, b_t, rows, slots, scale),
                      oracle_expand(y, h, b, rows, slots, scale)),
                     (lambda t: backend.gather_add(t, v, rows, slots, scale), oracle_add(y, v, rows, slots, scale)),
                     (lambda t: backend.gather_mul(t, v, rows, slots), oracle_mul(y, v, rows, slots))]:
        out = y.clone()
        assert op(out) is None
        assert out.dtype == act
        close(out, want, act)
    # both halves in one call: what the two calls give, bit for bit
    halves, fused = y.clone(), y.clone()
    backend.lora_expand(halves, h, b_t, rows, slots, scale)
    assert backend.lora(x, fused, a, b_t, rows, slots, scale) is None
    assert torch.equal(bits(fused), bits(halves))


@pytest.mark.parametrize("act,wt", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(40, 64, 48, 8), (9, 1100, 1030, 4), (33, 96, 80, 16)], ids=str)
def test_lora_with_one_use_per_row_equals_its_two_halves_bit_for_bit(backend, shape, act, wt):
    """Rows with one use each (a step without stacks), several sharing a slot, some rows in none: the fused CPU
    backend takes each tile of a slot's uses through both halves at once (float32), and every backend gives the
    bits of shrink then expand."""
    tokens, d_in, d_out, r = shape
    if backend is triton_ops and not triton_ops.available() and d_in * d_out > 100_000:
        pytest.skip("Triton's interpreter runs one program at a time: shapes this large run on a GPU")
    x, y, a, b, _, _, _, _ = case(tokens, (tokens, d_in, d_out, r, 5, 0), "runs", act, wt)
    g = torch.Generator().manual_seed(tokens)
    rows = torch.randperm(tokens, generator=g)[: tokens - 3]  # distinct rows, three in no use
    slots = torch.randint(0, 5, (rows.shape[0],), generator=g)
    order = torch.argsort(slots * tokens + rows, stable=True)  # sorted by (slot, row), as the techniques give them
    rows, slots = rows[order], slots[order]
    scale = torch.rand(rows.shape[0], generator=g) + 0.5
    b_t = b.transpose(1, 2).contiguous().transpose(1, 2)
    halves, fused = y.clone(), y.clone()
    backend.lora_expand(halves, backend.lora_shrink(x, a, rows, slots), b_t, rows, slots, scale)
    backend.lora(x, fused, a, b_t, rows, slots, scale)
    assert torch.equal(bits(fused), bits(halves))
    close(fused, oracle_expand(y, oracle_shrink(x, a, rows, slots), b, rows, slots, scale), act)


def test_reference_by_runs_equals_gathered(monkeypatch):
    """Past GATHER_ELEMENTS the reference goes by runs of one slot; both ways give the per-use results."""
    x, y, a, b, _, rows, slots, scale = case(3, (30, 32, 40, 8, 4, 50), "runs", torch.float32, torch.float32)
    gathered = reference.lora_shrink(x, a, rows, slots)
    monkeypatch.setattr(reference, "GATHER_ELEMENTS", 0)
    by_runs = reference.lora_shrink(x, a, rows, slots)
    close(by_runs, oracle_shrink(x, a, rows, slots), torch.float32)
    close(gathered, oracle_shrink(x, a, rows, slots), torch.float32)
    out = y.clone()
    reference.lora_expand(out, by_runs, b, rows, slots, scale)
    close(out, oracle_expand(y, by_runs, b, rows, slots, scale), torch.float32)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that NaN compares equal to itself."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("act,wt", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_unused_slots_and_rows_stay_out(backend, act, wt):
    """NaN and inf in slots no use names reach no row; rows in no use keep their bits (NaN included)."""
    x, y, a, b, v, _, _, _ = case(5, (12, 48, 40, 8, 6, 0), "runs", act, wt)
    rows = torch.tensor([0, 3, 3, 7, 9])
    slots = torch.tensor([1, 1, 4, 4, 4])
    scale = torch.tensor([1.0, 0.5, 2.0, 1.0, -1.0])
    for buf in (a, b, v):
        for bad in (0, 2, 3, 5):
            buf[bad].fill_(float("nan") if bad % 2 else float("inf"))
    unused = [i for i in range(12) if i not in rows.tolist()]
    y[unused[0], 0], y[unused[1], 1] = float("nan"), float("inf")
    h = backend.lora_shrink(x, a, rows, slots)
    assert torch.isfinite(h).all()
    for op in (lambda t: backend.lora_expand(t, h, b, rows, slots, scale),
               lambda t: backend.gather_add(t, v, rows, slots, scale),
               lambda t: backend.gather_mul(t, v, rows, slots)):
        out = y.clone()
        op(out)
        assert torch.isfinite(out[rows]).all()
        assert torch.equal(bits(out[unused]), bits(y[unused]))


def strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values laid out differently: a column slice of a wider tensor, every other element, or the
    transpose of the last two dims' storage."""
    if how == "slice":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 7, dtype=t.dtype)
        wide[..., 3:3 + t.shape[-1]] = t
        return wide[..., 3:3 + t.shape[-1]]
    if how == "every-other":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("how", ["slice", "every-other", "transposed"])
def test_non_contiguous_inputs_are_handled(backend, how):
    x, y, a, b, v, rows, slots, scale = case(9, (10, 36, 28, 8, 4, 14), "scattered", torch.float32, torch.float32)
    h = backend.lora_shrink(strided(x, how), strided(a, how), rows, slots)
    close(h, oracle_shrink(x, a, rows, slots), torch.float32)
    for op, want in [(lambda t: backend.lora_expand(t, strided(h, how), strided(b, how), rows, slots, scale),
                      oracle_expand(y, h, b, rows, slots, scale)),
                     (lambda t: backend.gather_add(t, strided(v, how), rows, slots, scale),
                      oracle_add(y, v, rows, slots, scale)),
                     (lambda t: backend.gather_mul(t, strided(v, how), rows, slots), oracle_mul(y, v, rows, slots))]:
        out = strided(y.clone(), how)
        op(out)
        close(out, want, torch.float32)


def test_malformed_uses_are_refused_with_one_line():
    x, y, a, b, v, rows, slots, scale = case(2, (6, 16, 12, 4, 3, 5), "runs", torch.float32, torch.float32)
    bad = [(lambda: kernels.lora_shrink(x, a[:, :, :8], rows, slots), "a must be"),
           (lambda: kernels.lora_shrink(x, a, rows, slots[:3]), "one length"),
           (lambda: kernels.lora_shrink(x, a, rows.int(), slots), "int64"),
           (lambda: kernels.lora_expand(y, torch.zeros(5, 3), b, rows, slots, scale), "expected h"),
           (lambda: kernels.gather_add(y, v[:, :4], rows, slots, scale), "v must be"),
           (lambda: kernels.gather_mul(y[0], v, rows, slots), "2-D"),
           (lambda: kernels.lora(x, y, a, b[:, :, :2], rows, slots, scale), "expected a"),
           (lambda: kernels.lora(x, y[:, :5], a, b, rows, slots, scale), "expected a")]
    for call, words in bad:
        with pytest.raises(ValueError, match=words) as info:
            call()
        assert "\n" not in str(info.value)


def test_the_fused_cpu_ops_check_shapes_before_reading():
    """The techniques call the backend without the seam's checks: the fused CPU ops refuse, before any read, shapes
    that would take them past a tensor's end."""
    module = load_backend("cpu")
    x, y, a, b, v, rows, slots, scale = case(2, (6, 16, 12, 4, 3, 5), "runs", torch.float32, torch.float32)
    bad = [(lambda: module.lora_shrink(x[:, :8], a, rows, slots), "does not fit"),
           (lambda: module.lora_shrink(x, a, rows, slots[:3]), "one length"),
           (lambda: module.lora_shrink(x, a, rows.int(), slots), "int64"),
           (lambda: module.lora_expand(y, torch.zeros(5, 3), b, rows, slots, scale), "does not fit"),
           (lambda: module.lora_expand(y[:, :6], torch.zeros(5, 4), b, rows, slots, scale), "does not fit"),
           (lambda: module.lora_expand(y, torch.zeros(5, 4), b, rows, slots, scale[:2]), "one length"),
           (lambda: module.lora(x, y, a, b[:, :, :2], rows, slots, scale), "not one slot buffer"),
           (lambda: module.lora(x[:, :4], y, a, b, rows, slots, scale), "does not fit"),
           (lambda: module.gather_add(y, v[:, :4], rows, slots, scale), "does not fit"),
           (lambda: module.gather_mul(y[0], v, rows, slots), "2-D")]
    for call, words in bad:
        before = y.clone()
        with pytest.raises(RuntimeError, match=words):
            call()
        assert torch.equal(y, before)


@pytest.mark.parametrize("act,wt", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def test_mixed_ranks_go_in_one_call_per_rank_class(backend, act, wt):
    """Two slot buffers of ranks 4 and 16 (no padding) applied to one batch: each row costs its own rank and
    gets its own adapter's delta; rows of neither class keep their values. B is stored [S, r, d_out] and
    passed transposed, the layout the fused kernels add by columns."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(9, 40, generator=g).to(act)
    y = torch.randn(9, 24, generator=g).to(act)
    want = y.double()
    out = y.clone()
    for r, rows, slots in [(4, [0, 2, 5], [1, 0, 1]), (16, [1, 5, 7], [2, 2, 0])]:
        a = (torch.randn(3, r, 40, generator=g) / 40 ** 0.5).to(wt)
        b = (torch.randn(3, r, 24, generator=g) / r ** 0.5).to(wt).transpose(1, 2)  # the fast layout
        rows, slots, scale = torch.tensor(rows), torch.tensor(slots), torch.rand(3, generator=g) + 0.5
        h = backend.lora_shrink(x, a, rows, slots)
        backend.lora_expand(out, h, b, rows, slots, scale)
        want = oracle_expand(want, oracle_shrink(x, a, rows, slots), b, rows, slots, scale)
    close(out, want, act)
    assert torch.equal(out[[3, 4, 6, 8]], y[[3, 4, 6, 8]])


def test_empty_batch(backend):
    """No tokens and no uses: empty results, nothing read."""
    x, y, a, b, v = torch.zeros(0, 16), torch.zeros(0, 12), torch.randn(2, 4, 16), torch.randn(2, 12, 4), torch.ones(2, 12)
    none, scale = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    assert backend.lora_shrink(x, a, none, none).shape == (0, 4)
    backend.lora_expand(y, torch.zeros(0, 4), b, none, none, scale)
    backend.gather_add(y, v, none, none, scale)
    backend.gather_mul(y, v, none, none)
    assert y.shape == (0, 12)


def test_out_of_range_uses_raise_instead_of_reading_memory(backend):
    """The host backends check every use; the Triton kernels do not (a check is a device-to-host sync per
    call), so on CUDA the engine's slot tables are what keep indices in range."""
    if backend is triton_ops or isinstance(backend, OnDevice):
        pytest.skip("the Triton kernels do not check ranges (see the docstring)")
    x, y, a, b, v, rows, slots, scale = case(4, (6, 16, 12, 4, 3, 5), "runs", torch.float32, torch.float32)
    with pytest.raises((IndexError, RuntimeError), match="out of (range|bounds)"):
        backend.lora_shrink(x, a, rows, slots + 3)
    with pytest.raises((IndexError, RuntimeError), match="out of (range|bounds)"):
        backend.gather_add(y, v, rows + 6, slots, scale)


def test_hub_kernels_chooses_the_backend(monkeypatch):
    monkeypatch.setenv("HUB_KERNELS", "reference")
    assert kernels.backend_name("cpu") == "reference"
    monkeypatch.setenv("HUB_KERNELS", "cpu")
    assert kernels.backend_name("cpu") == ("cpu" if cpu.load() is not None else "reference")
    assert kernels.backend_name("meta") == "reference"  # other devices keep the reference
    monkeypatch.setenv("HUB_KERNELS", "triton")
    assert kernels.backend_name("cpu") == "reference"  # triton serves CUDA tensors only
    monkeypatch.setenv("HUB_KERNELS", "fast")
    with pytest.raises(ValueError, match="HUB_KERNELS must be one of auto, reference, cpu, triton") as info:
        kernels.backend_name("cpu")
    assert "\n" not in str(info.value)


FALLBACK = """
import warnings, torch
from runtime import kernels
from runtime.kernels import reference
x, a = torch.randn(5, 16), torch.randn(3, 4, 16)
rows, slots = torch.tensor([0, 2, 4]), torch.tensor([2, 0, 2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    results = [kernels.lora_shrink(x, a, rows, slots) for _ in range(3)]
    name = kernels.backend_name("cpu")
ours = [str(w.message) for w in caught if str(w.message).startswith("kernels:")]
assert all(torch.equal(r, reference.lora_shrink(x, a, rows, slots)) for r in results)
print(name, len(ours), len(caught), ours)
"""


def test_a_failed_build_falls_back_to_the_reference_with_one_warning(tmp_path):
    """No compiler (CXX names a missing one, in a fresh cache): the ops give the reference's results, and the
    process warns once, however many calls follow."""
    env = {**os.environ, "CXX": "/nonexistent/c++", "HUB_KERNELS_DIR": str(tmp_path), "HUB_KERNELS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name, ours, caught, messages = done.stdout.split(" ", 3)
    assert (name, ours, caught) == ("reference", "1", "1"), done.stdout
    assert "could not be built" in messages and "using the reference ops" in messages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_cpu_splits_large_calls_over_threads_exactly(dtype):
    """Calls past the fused kernel's single-thread bound (prefill-sized) run in parallel tasks: the same results,
    with rows in several uses (written by one task each) and rows in none."""
    module = load_backend("cpu")
    x, y, a, b, v, rows, slots, scale = case(8, (200, 768, 1100, 16, 3, 300), "runs", dtype, dtype)
    b = b.transpose(1, 2).contiguous().transpose(1, 2)
    h = module.lora_shrink(x, a, rows, slots)
    close(h, oracle_shrink(x, a, rows, slots), dtype)
    for op, want in [(lambda t: module.lora_expand(t, h, b, rows, slots, scale),
                      oracle_expand(y, h, b, rows, slots, scale)),
                     (lambda t: module.gather_add(t, v, rows, slots, scale), oracle_add(y, v, rows, slots, scale))]:
        out = y.clone()
        op(out)
        close(out, want, dtype)
    unused = sorted(set(range(200)) - set(rows.tolist()))
    assert unused and torch.equal(out[unused], y[unused])


# Rows that share a slot: (tokens, d_in, d_out, r, run lengths). Widths of whole vectors (read in place) and
# not, rank 1 to 16, a width past the kernel's 256-column blocks that is no multiple of its 32-column chunks, and
# runs from one row to more than enough tiles to make the expand go by whole rows.
RUN_SHAPES = [(64, 64, 48, 8, [1, 2, 3, 4, 5, 9]), (40, 40, 72, 4, [7, 6, 13, 1]), (80, 576, 300, 8, [64, 2, 3, 1]),
              (24, 24, 16, 1, [4, 8, 2, 1, 3]), (36, 96, 40, 16, [17, 3, 10])]


def runs_of(lengths: list[int], tokens: int, g: torch.Generator):
    """Uses in runs of one slot (slot i for the i-th run), sorted by (slot, row) as the engine gives them, on
    distinct rows, plus two uses stacked on one more row (a row with several uses goes its own way)."""
    rows = torch.randperm(tokens, generator=g)[:sum(lengths) + 1]
    slots = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    order = torch.argsort(slots * tokens + rows[:-1], stable=True)
    rows = torch.cat([rows[:-1][order], rows[-1:].repeat(2)])
    slots = torch.cat([slots, torch.tensor([0, len(lengths) - 1])])
    return rows, slots, torch.rand(rows.shape[0], generator=g) * 4 - 2


@pytest.mark.parametrize("act,wt", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", RUN_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_fused_cpu_rows_sharing_a_slot_equal_a_per_use_loop(shape, act, wt):
    """The fused kernels compute the rows of a run of one slot several at a time (one load of the slot's
    weights for several rows): the results are every use's, in both layouts of b."""
    module = load_backend("cpu")
    tokens, d_in, d_out, r, lengths = shape
    g = torch.Generator().manual_seed(sum(lengths) + d_in)
    x = torch.randn(tokens, d_in, generator=g).to(act)
    y = torch.randn(tokens, d_out, generator=g).to(act)
    a = (torch.randn(len(lengths), r, d_in, generator=g) / d_in ** 0.5).to(wt)
    b = (torch.randn(len(lengths), d_out, r, generator=g) / r ** 0.5).to(wt)
    rows, slots, scale = runs_of(lengths, tokens, g)
    h = module.lora_shrink(x, a, rows, slots)
    tol = act if wt == act else torch.float32
    close(h, oracle_shrink(x, a, rows, slots), tol)
    for layout in (b, b.transpose(1, 2).contiguous().transpose(1, 2)):
        out = y.clone()
        module.lora_expand(out, h, layout, rows, slots, scale)
        close(out, oracle_expand(y, h, b, rows, slots, scale), act)


@pytest.mark.parametrize("act,wt", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", RUN_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
def test_fused_cpu_a_rows_result_does_not_depend_on_its_neighbours(shape, act, wt):
    """A row computed alone and the same row inside a run of rows sharing its slot (at any place in the run,
    the run any length) get the same bits: the kernels take several rows per load of the weights, but each
    row's sums run in the order they run in alone. So a request's output does not depend on what else is in its
    batch."""
    module = load_backend("cpu")
    tokens, d_in, d_out, r, lengths = shape
    g = torch.Generator().manual_seed(7 * d_out + r)
    x = torch.randn(tokens, d_in, generator=g).to(act)
    y = torch.randn(tokens, d_out, generator=g).to(act)
    a = (torch.randn(len(lengths), r, d_in, generator=g) / d_in ** 0.5).to(wt)
    b_t = (torch.randn(len(lengths), r, d_out, generator=g) / r ** 0.5).to(wt).transpose(1, 2)
    rows, slots, scale = runs_of(lengths, tokens, g)
    h = module.lora_shrink(x, a, rows, slots)
    layouts = {"b^T storage": b_t, "row-major b": b_t.contiguous()}
    together = {}
    for name, b in layouts.items():
        together[name] = y.clone()
        module.lora_expand(together[name], h, b, rows, slots, scale)
    stacked = rows[-1].item()
    for u in range(rows.shape[0] - 2):  # every use on a row of its own
        one = (rows[u:u + 1], slots[u:u + 1])
        alone = module.lora_shrink(x, a, *one)
        assert torch.equal(bits(alone), bits(h[u:u + 1])), f"use {u}: h alone differs from h in its run"
        for name, b in layouts.items():
            out = y.clone()
            module.lora_expand(out, alone, b, *one, scale[u:u + 1])
            row = rows[u].item()
            assert row != stacked and torch.equal(bits(out[row]), bits(together[name][row])), \
                f"use {u} ({name}): y alone differs from y in its run"


def test_fused_cpu_rounds_a_bfloat16_y_as_torch_does():
    """The fused kernels write a bfloat16 y in a vectorized loop of their own: y + a delta rounds to the nearest
    bfloat16 (ties to even) exactly as torch rounds a float32 sum, inf stays inf and NaN stays NaN (its sign and
    payload are c10's, which torch's own vectorized conversion does not keep). One use per row makes the delta
    one product, so torch can compute the same sum."""
    module = load_backend("cpu")
    g = torch.Generator().manual_seed(12)
    y = (torch.randn(40, 300, generator=g) * 100).to(torch.bfloat16)
    y[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    v = torch.randn(3, 300, generator=g).to(torch.bfloat16)
    rows, slots = torch.arange(40), torch.randint(0, 3, (40,), generator=g)
    scale = torch.rand(40, generator=g) * 1e-2  # deltas near y's last bits: every rounding case comes up
    out = y.clone()
    module.gather_add(out, v, rows, slots, scale)
    want = (y.float() + scale[:, None] * v[slots].float()).to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan) and torch.equal(bits(out[~nan]), bits(want[~nan]))


CACHED = """
import sys
from runtime.kernels import cpu
assert cpu.load() is not None
print("cpp_extension" if "torch.utils.cpp_extension" in sys.modules else "direct")
"""

AT_START = """
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from runtime.engine import Engine
from runtime.kernels import cpu
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2))
engine = Engine(model)
print(engine.kernels, "module" in cpu._state)
"""


def test_a_cached_build_is_imported_directly_and_an_engine_loads_it_at_start():
    """The fused ops are built once per cache; a later process imports the built file without the build tools
    (cpp_extension imports setuptools and runs ninja: seconds that a server's first LoRA request would wait),
    and an Engine takes its backend when it is made, not in its first batch."""
    env = {**os.environ, "HUB_KERNELS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = lambda code: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      timeout=600)
    first = run(CACHED)  # builds into the per-user cache if no earlier run did
    assert first.returncode == 0, first.stderr
    if "could not be built" in first.stderr:
        pytest.skip("no C++ compiler here: the fallback is tested above")
    again = run(CACHED)
    assert (again.returncode, again.stdout.strip()) == (0, "direct"), again.stderr
    started = run(AT_START)
    assert (started.returncode, started.stdout.strip()) == (0, "cpu True"), started.stderr


def test_the_fused_cpu_ops_let_other_threads_run_python():
    """While a fused op computes, the GIL is free: a Python thread keeps counting through the call (a server's
    request handlers and adapter loads go on during a step, as they do during ATen's own ops). A kernel that
    kept the GIL would freeze the counter from the call's start to its end."""
    module = cpu.load()
    if module is None:
        pytest.skip("the fused CPU kernels could not be built here (see the warning)")
    x, _, a, _, _, rows, slots, _ = case(1, (4096, 4096, 8, 256, 4, 8192), "runs", torch.float32, torch.float32)
    ticks: list[float] = []
    done = threading.Event()

    def count() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.02)
    start = time.perf_counter()
    module.lora_shrink(x, a, rows, slots)
    end = time.perf_counter()
    done.set()
    counter.join()
    # Python hands the GIL over every switch interval: the counter may still run at the call's edges
    margin = 10 * sys.getswitchinterval()
    if end - start < 3 * margin:
        pytest.skip(f"the call took {end - start:.3f} s, too short to tell on this machine")
    assert any(start + margin < t < end - margin for t in ticks)


def test_index_values_changed_in_place_are_regrouped(backend):
    """An index tensor the ops saw before, overwritten in place with other values (how a captured decode graph
    takes a new batch's rows, runtime/graphs.py), gives the new values' results once `indices_changed` is told:
    the Triton kernels keep a per-row grouping of `rows` and recompute it in place."""
    x, y, a, b, v, rows, slots, scale = case(3, (6, 16, 12, 4, 3, 5), "runs", torch.float32, torch.float32)
    h = backend.lora_shrink(x, a, rows, slots)
    backend.lora_expand(y.clone(), h, b, rows, slots, scale)  # the backend may keep what it derived from rows
    backend.gather_add(y.clone(), v, rows, slots, scale)
    moved = torch.flip(rows, [0]).clone()  # other values, same shape
    rows.copy_(moved)
    kernels.indices_changed(rows)
    for op, want in [(lambda t: backend.lora_expand(t, h, b, rows, slots, scale), oracle_expand(y, h, b, moved, slots, scale)),
                     (lambda t: backend.gather_add(t, v, rows, slots, scale), oracle_add(y, v, moved, slots, scale))]:
        out = y.clone()
        op(out)
        close(out, want, torch.float32)


def test_uses_padded_for_a_graph_bucket_leave_the_live_rows_as_they_were(backend):
    """A graphed decode step pads its index tensors to a bucket (runtime/techniques/slots.py `Padding`): the
    added uses read a held slot with scale 0 into the padding rows. Every backend (Triton's grouping per row
    included) then gives the live rows exactly what the unpadded uses give them, whatever the padding rows hold."""
    from runtime.techniques.slots import Padding, bucket

    live, size = 5, bucket(6)
    x, y, a, b, v, _, _, _ = case(7, (size, 32, 24, 4, 4, 0), "runs", torch.float32, torch.float32)
    rows = torch.tensor([0, 2, 4, 1, 3, 4])  # sorted by (slot, row); six uses: padded to a bucket of 8
    slots = torch.tensor([0, 0, 0, 2, 2, 3])
    scale = torch.tensor([1.0, 0.5, -1.0, 2.0, 1.0, 0.25])
    x[live:], y[live:] = float("nan"), float("inf")  # padding rows: what a padding token left there
    p_rows, p_slots, p_scale = Padding(live, size).slot_uses([(rows, slots, scale)])[0]
    assert p_rows.shape[0] > rows.shape[0] and bool((p_rows[rows.shape[0]:] >= live).all())
    h = backend.lora_shrink(x[:live], a, rows, slots)
    p_h = backend.lora_shrink(x, a, p_rows, p_slots)
    assert torch.equal(p_h[:rows.shape[0]], h)
    for op in (lambda t, h, r, s, c: backend.lora_expand(t, h, b, r, s, c),
               lambda t, h, r, s, c: backend.gather_add(t, v, r, s, c),
               lambda t, h, r, s, c: backend.gather_mul(t, v, r, s)):
        want, got = y[:live].clone(), y.clone()
        op(want, h, rows, slots, scale)
        op(got, p_h, p_rows, p_slots, p_scale)
        assert torch.equal(bits(got[:live]), bits(want))
