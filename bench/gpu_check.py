"""CUDA check of the engine: the same code as on the CPU, equal to PEFT on the GPU.

On a tiny random Llama on CUDA: a mixed batch (LoRA r=4, rsLoRA r=8, IA3, prompt tuning, no adapter)
against each row's own PEFT run on the same device, in fp32 and bf16; and greedy generation of a row
alone vs batched with others. Prints the max abs differences (fp32 bound: 1e-4; bf16 is reported).

    python bench/gpu_check.py            # on CUDA (the point); `--device cpu` runs the same checks here
"""
from __future__ import annotations

import atexit
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' tiny model and adapter helpers

from conftest import save_peft_adapter as save, tiny_llama  # noqa: E402

from hub.artifact import read_adapter  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.generate import Batch, Row  # noqa: E402
from runtime.plan import AdapterUse, RowPlan  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402


def main() -> int:
    from peft import IA3Config, LoraConfig, PeftModel, PromptTuningConfig

    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    tmp = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the random adapters are scratch
    cpu = tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    folders = {
        "lora4": save(cpu, LoraConfig(r=4, lora_alpha=8, target_modules=targets), tmp / "lora4", 1),
        "rslora8": save(cpu, LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=targets), tmp / "rs8", 2),
        "ia3": save(cpu, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                    tmp / "ia3", 3),
        "prompt": save(cpu, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), tmp / "pt", 4),
    }
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21, 22], [23, 24]]
    keys = ["lora4", "rslora8", "ia3", "prompt", None]
    worst_ok = True
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, None)):
        base = copy.deepcopy(cpu).to(device, dtype)
        engine = Engine(copy.deepcopy(base))
        for key, folder in folders.items():
            engine.load(key, read_adapter(folder))
        width = max(len(r) for r in rows)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        plans = [RowPlan((AdapterUse(k),)) if k else RowPlan() for k in keys]
        with torch.inference_mode():
            logits, _ = engine.forward(ids, mask, plans)
            for i, (key, r) in enumerate(zip(keys, rows)):
                ref_model = PeftModel.from_pretrained(copy.deepcopy(base), folders[key]).eval() if key else base
                ref = ref_model(torch.tensor([r], device=device)).logits[0, -len(r):].float()
                diff = (logits[i, -len(r):].float() - ref).abs().max().item()
                ok = bound is None or diff <= bound
                worst_ok &= ok
                print(f"{device} {str(dtype):<15} row {i} {key or 'base':<8} max|engine - PEFT| = {diff:.2e}"
                      f"{'' if bound is None else ('  ok' if ok else '  FAIL')}")
        if dtype is torch.float32:
            def greedy(which: list[int]) -> dict[int, list[int]]:
                batch = Batch(engine, max_rows=8)
                seqs = {i: Row(str(i), rows[i], plans[i], SamplingParams(max_new_tokens=12)) for i in which}
                for s in seqs.values():
                    batch.add(s)
                while len(batch):
                    batch.step()
                return {i: s.output_ids for i, s in seqs.items()}

            together = greedy(list(range(len(rows))))
            alone = {i: greedy([i])[i] for i in range(len(rows))}
            same = together == alone
            worst_ok &= same
            print(f"{device} fp32 greedy: alone == batched for every row: {same}")
    print("gpu_check:", "PASS" if worst_ok else "FAIL")
    return 0 if worst_ok else 1


if __name__ == "__main__":
    sys.exit(main())
