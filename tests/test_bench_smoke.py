"""Smoke test of the benchmark suite (bench/run.py): the sweep and the scale bench, end to end, on a tiny
random model with tiny sizes. It checks that they run and write their result files with the expected
keys, and the facts that do not depend on timing (the engine picks PEFT's greedy tokens; a budget of 3
adapters under 8 distinct ones evicts; no request fails). No timing assertions: figures come from
`make bench`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import run as bench_run  # noqa: E402

pytestmark = pytest.mark.slow  # runs the bench scripts, some as processes with a real server


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a word-level tokenizer, saved as the local folder `--base-model` takes
    (the server loads a tokenizer with the model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from helpers import tiny_llama

    folder = tmp_path_factory.mktemp("bench-tiny")
    tiny_llama().save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


def test_sweep_and_scale_write_results(tiny_model_dir, tmp_path):
    out = tmp_path / "results"
    args = bench_run.parser().parse_args([
        "--only", "sweep", "--only", "scale", "--out", str(out), "--base-model", str(tiny_model_dir),
        "--sweep-rows", "4", "--sweep-prompt-tokens", "4", "--sweep-steps", "2", "--sweep-counts", "1,4",
        "--sweep-repeats", "1",
        "--scale-adapters", "12", "--scale-fit", "3", "--scale-tight", "1", "--scale-requests", "8",
        "--scale-concurrency", "2", "--scale-new-tokens", "2", "--scale-prompt-tokens", "4",
    ])
    bench_run.run(args.only, args)

    results = json.loads((out / "results.json").read_text())
    assert {"machine", "sweep", "scale"} <= results.keys()
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "results.md").read_text()
    assert results["sweep"]["table"] in markdown and results["scale"]["table"] in markdown

    sweep = results["sweep"]
    assert {(r["adapters"], r["system"]) for r in sweep["results"]} == {
        (n, s) for n in (1, 4) for s in ("base model alone", "this engine", "PEFT mixed batch")}
    for r in sweep["results"]:
        assert {"prefill_tokens_per_s", "decode_tokens_per_s", "prefill_vs_base", "decode_vs_base"} <= r.keys()
        if r["system"] == "this engine":
            assert r["greedy_tokens_equal_to_peft"] == 1.0

    scale = results["scale"]
    assert scale["push"]["count"] == 12 and scale["server_exit_code"] == 0
    assert set(scale["phases"]) == {"base", "zipf", "zipf, again", "round-robin", "round-robin, 1 fit"}
    for name, phase in scale["phases"].items():
        assert phase["requests"] == 8 and phase["errors"] == 0, phase["error_examples"]
        assert {"ttft_p50_s", "ttft_p95_s", "tokens_per_s"} <= phase.keys()
        assert {"device_hit_ratio", "device_evictions", "disk_loads"} <= phase["cache"].keys()
    assert scale["phases"]["round-robin"]["cache"]["device_evictions"] > 0  # 8 distinct adapters, room for 3
    assert scale["tiers_at_end"]["adapters_by_tier"].get("device", 0) <= 3
    assert "waits" in scale["phases"]["round-robin, 1 fit"]["cache"]  # 2 clients, room for 1: none fails (above)


def test_random_base_keeps_shapes_and_tokenizer_and_draws_new_weights(tiny_model_dir, tmp_path):
    """bench/random_base.py: what a GPU machine times when the real weights cannot travel."""
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "random"
    # seed 7: tiny_model_dir's weights were drawn with seed 0 from this same config, as random_base's default would
    subprocess.run([sys.executable, str(BENCH / "random_base.py"), str(tiny_model_dir), str(out), "--seed", "7"],
                   check=True, capture_output=True)
    original, drawn = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_model_dir, out))
    assert drawn.config.to_dict() | {"_name_or_path": ""} == original.config.to_dict() | {"_name_or_path": ""}
    pairs = list(zip(original.state_dict().items(), drawn.state_dict().items()))
    assert all(a[0] == b[0] and a[1].shape == b[1].shape for a, b in pairs)
    assert any(not torch.equal(a[1], b[1]) for a, b in pairs)
    assert AutoTokenizer.from_pretrained(out)("w5 w6")["input_ids"] == AutoTokenizer.from_pretrained(tiny_model_dir)("w5 w6")["input_ids"]


def test_gpu_check_runs_its_checks_on_the_cpu():
    """bench/gpu_check.py (what a GPU machine runs first) kept working between GPU sessions: the same
    checks with `--device cpu` (engine vs PEFT per technique in fp32 within 1e-4, greedy alone == batched)."""
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "gpu_check: PASS"
    assert sum(line.endswith("  ok") for line in lines) == 5  # fp32: the five rows (four techniques, one bare)
    assert "cpu fp32 greedy: alone == batched for every row: True" in lines


@pytest.mark.parametrize("no_peft", [False, True])
def test_e2e_bench_runs_a_real_server_with_and_without_peft(tiny_model_dir, no_peft):
    """bench/e2e_bench.py --quick on the tiny model: a real `hub serve`, mixed LoRAs and no adapters, PEFT's
    mixed batch unless --no-peft (what a GPU session passes to save PEFT's minutes); no request fails."""
    import subprocess

    args = [sys.executable, str(BENCH / "e2e_bench.py"), "--quick", "--base-model", str(tiny_model_dir)]
    done = subprocess.run(args + (["--no-peft"] if no_peft else []), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split("  ")[1].strip(): line for line in done.stdout.splitlines()
            if line.startswith("  server,") or line.startswith("  PEFT,")}
    assert set(rows) == {"server, 4 distinct LoRAs (q,v)", "server, no adapters"} | (
        set() if no_peft else {"PEFT, one batch, adapter_names (q,v)"})
    assert all(line.split()[-1] == "0" for line in rows.values())  # the errors column
    ratios = next(line for line in done.stdout.splitlines() if line.startswith("LoRAs q,v"))
    assert ("PEFT not run (--no-peft)" in ratios) == no_peft and ("PEFT's mixed batch" in ratios) != no_peft


def test_e2e_bench_http_mode_compares_the_frontends(tiny_model_dir):
    """bench/e2e_bench.py --http --quick on the tiny model: the same streaming clients over HTTP and gRPC
    against one real `hub serve`, every token counted on both, no request failing, and the ratio line."""
    import subprocess

    args = [sys.executable, str(BENCH / "e2e_bench.py"), "--http", "--quick", "--base-model", str(tiny_model_dir)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith(("  gRPC", "  HTTP"))}
    assert set(rows) == {"gRPC", "HTTP"} and rows["gRPC"][3] == rows["HTTP"][3] == "32"  # 4 clients x 8 tokens
    assert all(r[-1] == "0" for r in rows.values())  # the errors column
    assert any(line.startswith("HTTP / gRPC, per-repeat ratios") for line in done.stdout.splitlines())


def test_registry_scale_bench_runs_and_reports_each_size():
    """bench/registry_scale.py at toy sizes: each size is reached exactly and gets its row of figures, and the
    bulk pushes (folders, and a --batch list) their lines."""
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "registry_scale.py"), "--sizes", "12", "20", "--rounds", "1",
                           "--bulk", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table, bulk = done.stdout.split("\n\n")
    rows = [line.split() for line in table.splitlines()[2:]]
    assert [r[0] for r in rows] == ["12", "20", "ratio"] and all(r[-1] == "ms" for r in rows[:2]), done.stdout
    assert rows[2][-1].endswith("x") and bulk.startswith("bulk hub push of 2 folders"), done.stdout
    assert "folders/s into 12 versions" in bulk and "folders/s into 20 versions" in bulk, done.stdout
    assert "\nbulk hub push --batch of 2 folders" in bulk, done.stdout


def test_kernel_bench_runs_every_part():
    """bench/kernel_bench.py at tiny sizes: the per-op, step and join tables print (figures: docs/benchmarks.md)."""
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "kernel_bench.py"), "--layers", "1", "--repeats", "1",
                           "--rows", "4", "--adapters", "2", "--dtypes", "float32", "--join-ranks", "4",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from runtime.kernels import cpu

    fused = cpu.load() is not None  # without a compiler the step part says it has no fast backend
    for title in ("Per op:", "Batch changes", "indices ms", "stacked / fused" if fused else "no fast backend"):
        assert title in done.stdout


def test_decode_step_runs_graphed_and_eager(tiny_model_dir):
    """bench/decode_step.py on the tiny model: the graphed (emulated on a CPU) and eager settings of the base and
    of LoRA rows print their step times (figures: docs/gpu.md). The 4 LoRAs are drawn after the first one is
    loaded, so wrapped layers: the engine refuses an adapter with no tensors, which such a draw once was."""
    import subprocess

    done = subprocess.run([sys.executable, str(BENCH / "decode_step.py"), "--base-model", str(tiny_model_dir),
                           "--quick", "--shapes", "q,v", "--sizes", "1,4", "--cpu-time"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in ("base ", "1 distinct LoRAs (q,v)", "4 distinct LoRAs (q,v)"):
        for setting in ("graphs, ", "eager, "):
            assert any(row.startswith(line) and setting in row for row in done.stdout.splitlines()), done.stdout


def test_step_cost_times_each_build_and_part(tiny_model_dir):
    """bench/step_cost.py on the tiny model: the step's parts and the kernels against reading their bytes, for
    two builds of the fused kernels (the seam's own and a copy of its source)."""
    import subprocess

    from runtime.kernels import cpu

    if cpu.load() is None:
        pytest.skip("the fused CPU kernels cannot be built here")
    done = subprocess.run([sys.executable, str(BENCH / "step_cost.py"), "--base-model", str(tiny_model_dir),
                           "--rows", "4", "--steps", "2", "--repeats", "1", "--build", "seam=",
                           "--build", f"copy={cpu.SOURCE}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in ("base ", "4 distinct, seam", "4 distinct, copy", "one shared, copy", "4 distinct, reading the bytes",
                 "4 distinct, calls only"):
        assert any(row.startswith(line) or line in row for row in done.stdout.splitlines()), done.stdout


STAND_IN = """
import torch
from runtime import kernels
from runtime.engine import Engine
from helpers import tiny_llama
print(kernels.backend("cpu").__name__, kernels.backend("meta").__name__)
Engine(tiny_llama())
"""


def test_floor_puts_a_stand_in_backend_under_any_process(tmp_path):
    """bench/floor/sitecustomize.py, for a process started with HUB_BENCH_STAND_IN and that folder on PYTHONPATH
    (as a bench script's `hub serve`): the CPU backend is the stand-in, other devices keep theirs; a wrong mode
    stops the process with one line."""
    import os
    import subprocess

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH / "floor"), str(tests), str(BENCH.parent)])}
    done = subprocess.run([sys.executable, "-c", STAND_IN], env={**env, "HUB_BENCH_STAND_IN": "read"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "stand-in (reading the bytes) runtime.kernels.reference", done.stdout
    assert "LoRA ops on stand-in (reading the bytes)" in done.stderr
    wrong = subprocess.run([sys.executable, "-c", "pass"], env={**env, "HUB_BENCH_STAND_IN": "fast"},
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "HUB_BENCH_STAND_IN must be read or calls" in wrong.stderr


def test_gil_share_sums_samples_per_thread_role():
    """bench/gil_share.py on py-spy's raw format (`--threads --subprocesses`): samples per role of the server's
    threads, the other process left out when one is named."""
    import gil_share

    raw = "\n".join([
        'process 7:"python3 -m hub serve --port 0";thread (0x1a): adapterhub-scheduler;_loop (runtime/scheduler.py:178);'
        'step (runtime/generate.py:150) 30',
        'process 7:"python3 -m hub serve --port 0";thread (0x1b): adapterhub-rpc_0;Generate (runtime/service.py:90) 10',
        'process 7:"python3 -m hub serve --port 0";thread (0x1c): adapterhub-rpc_3;Generate (runtime/service.py:90) 5',
        'process 7:"python3 -m hub serve --port 0";thread (0x1d): MainThread;wait (threading.py:320) 5',
        'process 9:"python3 bench/e2e_bench.py";thread (0x2a): MainThread;main (bench/e2e_bench.py:1) 99'])
    parsed = gil_share.parse(raw)
    server = parsed['process 7:"python3 -m hub serve --port 0"']
    assert sum(server["engine loop"].values()) == 30 and sum(server["rpc workers"].values()) == 15
    assert server["rpc workers"]["Generate (runtime/service.py:90)"] == 15
    text = gil_share.report(parsed, "hub serve", top=3)
    assert "50 samples holding the GIL" in text and "engine loop: 30 samples, 60%" in text and "e2e_bench" not in text
