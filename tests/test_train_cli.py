"""`hub train` on a tiny Llama with a character tokenizer: it learns, records the run in the manifest,
pushes what the engine then serves exactly as PEFT computes it, repeats itself under a seed, and
reports bad rows in one line without writing anything."""
from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from helpers import tiny_llama
from hub.cli import app
from hub.registry import Registry
from server_support import char_tokenizer

pytestmark = pytest.mark.slow  # `hub train` runs, training loops

runner = CliRunner()
REPLY = "ok!"


def hub(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama with a large enough output head for a few steps to matter, and its tokenizer."""
    folder = tmp_path_factory.mktemp("train-cli") / "base"
    tiny_llama(initializer_range=0.2).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path):
    """Twenty rows teaching one reply, in both formats (chats with two assistant turns among them)."""
    rng = random.Random(0)
    rows = []
    for i in range(20):
        prompt = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 5)))
        rows.append({"prompt": prompt, "completion": REPLY} if i % 2 else {"messages": [
            {"role": "user", "content": prompt}, {"role": "assistant", "content": REPLY},
            {"role": "user", "content": prompt[::-1]}, {"role": "assistant", "content": REPLY}]})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(base, data, out, *extra: str):
    result = hub("train", "--technique", "lora", "--data", str(data), "--name", "team/ok", "--version", "1.0.0",
                 "--base-model", str(base), "--batch-size", "4", "--lr", "3e-2", "--r", "4",
                 "--out", str(out), *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "training.json").read_text())


def test_train_learns_records_the_run_and_pushes_what_the_engine_serves(base, data, tmp_path, hub_home):
    from peft import PeftModel

    from hub import basemodel
    from runtime.engine import Engine
    from runtime.plan import AdapterUse, RowPlan

    out = tmp_path / "run"
    record = train(base, data, out, "--steps", "30", "--eval-split", "0.2", "--eval-every", "10", "--seed", "4",
                   "--push", "--description", "says ok")
    assert record["final_train_loss"] < 0.5 * record["train_losses"][0]
    assert [s for s, _ in record["val_losses"]] == [10, 20, 30]
    assert record["final_val_loss"] == round(min(v for _, v in record["val_losses"]), 6)

    [manifest] = Registry().list()
    train_record = manifest.lineage["train"]
    assert train_record == {k: v for k, v in record.items() if k not in ("train_losses", "val_losses")}
    examples = train_record["data"].pop("examples")  # one per assistant turn of the 16 rows kept for training
    assert 16 + 6 <= examples <= 16 + 10  # 4 of the 20 rows held out: 6 to 10 of the 10 two-turn chats remain
    assert train_record["data"] == {"file": "train.jsonl", "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                    "rows": 20}
    assert train_record["validation"] == {"split": 0.2, "rows": 4}
    assert train_record["options"] == {"target_modules": [], "layers": [], "r": 4, "lora_alpha": 16}
    assert train_record["hyperparams"]["seed"] == 4 and train_record["steps_done"] == 30
    assert {"torch", "transformers", "peft"} <= set(train_record["libraries"])
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    shown = hub("show", "team/ok@1.0.0")
    assert shown.exit_code == 0 and '"final_val_loss": ' in shown.output
    assert train_record["data"]["sha256"] in shown.output

    model, tokenizer = basemodel.load(str(base))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "abc"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        expected = PeftModel.from_pretrained(tiny_llama(initializer_range=0.2), out / "adapter")(input_ids=ids).logits
    engine = Engine(model)
    engine.load("ok", Registry().read(manifest))
    served, _ = engine.forward(ids, torch.ones_like(ids), [RowPlan((AdapterUse("ok"),))])
    assert not torch.allclose(expected, before, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(served, expected, atol=1e-4, rtol=0)
    assert expected[0, -1].argmax().item() == tokenizer.convert_tokens_to_ids(REPLY[0])  # it learned the reply


def test_seeded_runs_are_reproducible(base, data, tmp_path):
    a = train(base, data, tmp_path / "a", "--steps", "6", "--seed", "2", "--eval-every", "3", "--eval-data", str(data))
    b = train(base, data, tmp_path / "b", "--steps", "6", "--seed", "2", "--eval-every", "3", "--eval-data", str(data))
    assert a["train_losses"] == b["train_losses"] and a["val_losses"] == b["val_losses"]
    weights = [(tmp_path / run / "adapter" / "adapter_model.safetensors").read_bytes() for run in "ab"]
    assert weights[0] == weights[1]
    c = train(base, data, tmp_path / "c", "--steps", "6", "--seed", "3", "--eval-every", "3", "--eval-data", str(data))
    assert c["train_losses"] != a["train_losses"]  # the seed does choose the batches


def test_bad_rows_are_listed_in_one_line_and_nothing_is_written(base, tmp_path, hub_home):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n\n{"messages": [}\n'
                    '{"messages": [{"role": "user", "content": "x"}]}\n')
    result = hub("train", "--technique", "lora", "--data", str(path), "--name", "x", "--version", "1.0.0",
                 "--base-model", str(base), "--out", str(tmp_path / "run"), "--push")
    assert result.exit_code == 1
    [line] = result.output.splitlines()
    assert line.startswith("error: ") and "3 bad row(s)" in line
    assert "line 2 (expected" in line and "line 4 (malformed JSON" in line and "line 5 (no assistant turn" in line
    assert not (tmp_path / "run").exists() and Registry().list() == []


@pytest.mark.parametrize("args, message", [
    (["--eval-split", "0.5", "--eval-data", "x.jsonl"], "--eval-data or --eval-split, not both"),
    (["--steps", "3", "--epochs", "1"], "--steps or --epochs, not both"),
    (["--eval-split", "1.5"], "--eval-split must be between 0 and 1"),
    (["--technique", "bottleneck", "--config", "adapterfusion"], "unknown bottleneck config 'adapterfusion'"),
    (["--technique", "lorax"], "--technique must be one of lora, ia3, prompt_tuning, bitfit, bottleneck"),
    (["--to", "/tmp/anywhere"], "--to publishes the pushed version: give --push too"),
    (["--push", "--to", "nowhere"], "no remote named 'nowhere'"),
])
def test_bad_options_fail_in_one_line(base, data, tmp_path, args, message):
    result = hub("train", "--technique", "lora", "--data", str(data), "--name", "x", "--version", "1.0.0",
                 "--base-model", str(base), "--out", str(tmp_path / "run"), *args)
    assert result.exit_code == 1 and result.output.startswith("error: ") and message in result.output
    assert len(result.output.splitlines()) == 1


def test_sigint_stops_the_run_and_keeps_the_best_checkpoint(base, data, tmp_path, hub_home):
    """A real Ctrl-C (SIGINT) to a `hub train` process, sent once it has validated a checkpoint: the process
    saves and pushes the best checkpoint so far, records the interruption, and exits 130."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub", "train", "--technique", "bitfit", "--data", str(data), "--eval-data", str(data),
         "--name", "stopped", "--version", "1.0.0", "--base-model", str(base), "--steps", "1000000",
         "--eval-every", "2", "--out", str(out), "--push"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait for the first validated checkpoint, then press Ctrl-C
        if " val " in line:
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted after" in stderr and "pushed stopped@1.0.0" in stdout
    record = Registry().resolve("stopped@1.0.0").lineage["train"]
    assert record["interrupted"] and record["steps_done"] < 1000000
    assert record["kept_step"] % 2 == 0 and record["final_val_loss"] is not None
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_hub_starts_without_torch():
    """`hub train` and `hub eval` are mounted on the hub CLI without importing torch (hub.train does)."""
    import subprocess
    import sys

    code = "import sys, hub.cli; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_datasets_folders_train_like_their_jsonl(base, data, tmp_path, hub_home):
    """A `datasets` save_to_disk folder is read as the JSONL it was made from (the record names the folder's
    digest); bad rows are named by row number; a folder of several splits asks for one."""
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    folder = tmp_path / "train-ds"
    columns = {key: [r.get(key) for r in rows] for key in ("prompt", "completion", "messages")}
    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))  # both row formats in one table

    from_file = train(base, data, tmp_path / "file", "--steps", "3", "--seed", "0")
    from_folder = train(base, folder, tmp_path / "folder", "--steps", "3", "--seed", "0")
    assert from_folder["train_losses"] == from_file["train_losses"]
    assert from_folder["data"]["file"] == "train-ds" and from_folder["data"]["rows"] == 20
    assert len(from_folder["data"]["sha256"]) == 64 and from_folder["data"]["sha256"] != from_file["data"]["sha256"]

    bad = tmp_path / "bad-ds"
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3 * "x"},
                                {"prompt": None, "completion": "c"}]).save_to_disk(str(bad))
    result = hub("train", "--technique", "lora", "--data", str(bad), "--name", "x", "--version", "1.0.0",
                 "--base-model", str(base), "--out", str(tmp_path / "never"))
    assert result.exit_code == 1 and "1 bad row(s), none used: row 3 (expected" in result.output
    assert not (tmp_path / "never").exists()

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(splits))
    result = hub("train", "--technique", "lora", "--data", str(splits), "--name", "x", "--version", "1.0.0",
                 "--base-model", str(base))
    assert result.exit_code == 1 and f"give one split's folder, e.g. {splits / 'train'}" in result.output

    result = hub("train", "--technique", "lora", "--data", str(tmp_path), "--name", "x", "--version", "1.0.0",
                 "--base-model", str(base))
    assert result.exit_code == 1 and "not a folder written by datasets' save_to_disk" in result.output


def test_push_to_a_remote_publishes_the_trained_version(base, data, tmp_path, hub_home):
    record = train(base, data, tmp_path / "run", "--steps", "2", "--push", "--to", str(tmp_path / "remote"))
    published = Registry(tmp_path / "remote").resolve("team/ok@1.0.0")
    assert published.sha256 == Registry().resolve("team/ok@1.0.0").sha256
    assert published.lineage["train"]["data"]["sha256"] == record["data"]["sha256"]
