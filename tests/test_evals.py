"""Evaluation records: `hub eval` appends them beside the version (its files and sha256 untouched), `hub show`
lists them, `hub list --sort` ranks by them, push and pull to directory remotes carry them (once),
concurrent appends lose nothing; `hub compare` puts two versions side by side; `hub eval --server` gives
the in-process numbers through a real server."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import random

import pytest

from hub import evals
from hub.registry import Registry
from test_train_cli import base, data, hub  # noqa: F401  (fixtures: a tiny base with a tokenizer, a JSONL file)
from test_train_eval import pushed  # noqa: F401  (lora, ia3 and prompt pushed as NAME@1.0.0)


def evaluated(*args: str) -> dict[str, float]:
    result = hub("eval", *args, "--json")
    assert result.exit_code == 0, result.output
    return {r["ref"]: r["value"] for r in json.loads(result.stdout)}


def show(ref: str, *extra: str) -> dict:
    result = hub("show", ref, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ranked(*args: str) -> list[tuple[str, float | None]]:
    result = hub("list", *args, "--json")
    assert result.exit_code == 0, result.output
    return [(r["ref"], r["evaluation"] and r["evaluation"]["value"]) for r in json.loads(result.stdout)]


def test_records_are_kept_beside_the_version_shown_ranked_and_pushed(data, pushed, tmp_path, hub_home):  # noqa: F811
    before = {ref: show(ref) for ref in ("lora@1.0.0", "ia3@1.0.0")}
    values = evaluated("lora", "ia3", "--data", str(data), "--max-len", "200")

    for ref, manifest in before.items():
        after = show(ref)
        assert (after["sha256"], after["files"]) == (manifest["sha256"], manifest["files"])  # the artifact is as it was
        [record] = after["evaluations"]
        assert record["metric"] == "loss" and record["value"] == values[ref] and record["n"] > 0
        assert record["base_value"] == values["(base)"] and record["sha256"] == manifest["sha256"]
        assert record["dataset"] == {"file": "train.jsonl", "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
                                     "rows": 20}
        assert record["base_model"]["fingerprint"] and record["settings"]["max_len"] == 200
    assert hub("verify").exit_code == 0
    assert json.loads(json.dumps(Registry().index().get("lora", "1.0.0").to_dict())) == \
        {k: v for k, v in show("lora").items() if k not in ("ref_tags", "evaluations")}
    text = hub("show", "lora").stdout
    assert "evaluations: 1" in text and f"loss {values['lora@1.0.0']:.4f}" in text and "train.jsonl sha256:" in text

    # ranked best first; the version never evaluated comes last
    order = sorted(["lora@1.0.0", "ia3@1.0.0"], key=values.get)
    assert ranked("--sort", "loss") == [(order[0], values[order[0]]), (order[1], values[order[1]]),
                                        ("prompt@1.0.0", None)]
    assert ranked("--sort", "loss", "--limit", "1") == [(order[0], values[order[0]])]
    assert [r for r, _ in ranked("--sort", "perplexity")] == ["ia3@1.0.0", "lora@1.0.0", "prompt@1.0.0"]  # none yet
    table = hub("list", "--sort", "loss").stdout.splitlines()
    assert table[0].split()[:3] == ["REF", "TECHNIQUE", "LOSS"] and table[1].startswith(order[0])

    # a second data set: values on different data do not compare unless one is chosen
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line + "\n" for line in data.read_text().splitlines()[:5]))
    values2 = evaluated("prompt", "lora", "--data", str(other), "--no-base")
    bad = hub("list", "--sort", "loss")
    assert bad.exit_code == 1 and "2 data sets" in bad.output and "--dataset" in bad.output
    sha = hashlib.sha256(other.read_bytes()).hexdigest()
    best = min(values2, key=values2.get)
    assert ranked("--sort", "loss", "--dataset", sha[:10])[0] == (best, values2[best])
    assert len(show("lora")["evaluations"]) == 2

    # push --to a directory remote carries the records, once however often it is pushed; pull brings them back
    remote = tmp_path / "remote"
    for _ in range(2):
        assert hub("push", "lora@1.0.0", "--to", str(remote)).exit_code == 0
    assert len(show("lora", "--registry", str(remote))["evaluations"]) == 2
    fresh = tmp_path / "fresh"
    assert hub("pull", "lora@1.0.0", "--from", str(remote), "--registry", str(fresh)).exit_code == 0
    assert show("lora", "--registry", str(fresh))["evaluations"] == show("lora")["evaluations"]
    evaluated("lora", "--data", str(other), "--no-base", "--registry", str(fresh))  # a third, made elsewhere
    assert hub("push", "lora@1.0.0", "--to", str(remote), "--registry", str(fresh)).exit_code == 0
    assert hub("pull", "lora@1.0.0", "--from", str(remote)).exit_code == 0
    assert len(show("lora")["evaluations"]) == 3

    assert hub("eval", "ia3", "--data", str(data), "--no-record").exit_code == 0
    assert len(show("ia3")["evaluations"]) == 1


def test_bad_record_files_and_options_fail_in_one_line(data, pushed, hub_home):  # noqa: F811
    manifest = Registry().resolve("lora")
    path = evals.records_path(hub_home, manifest)
    record = evals.new_record(manifest, "loss", 1.5, 10, {"file": "x", "sha256": "ab", "rows": 1}, {}, {})
    evals.append(hub_home, manifest, [record])
    with open(path, "a") as f:
        f.write('{"id": "half a line wr')  # an append in progress: not yet a record
    assert [r["id"] for r in show("lora")["evaluations"]] == [record["id"]]
    with open(path, "a") as f:
        f.write('itten"}\n')
    result = hub("show", "lora")
    assert result.exit_code == 1 and "line 2 lacks one of the record fields" in result.output
    assert len(result.output.strip().splitlines()) == 1

    for args, message in [(["--sort", "speed"], "--sort takes a metric"), (["--dataset", "ab"], "--dataset applies")]:
        result = hub("list", *args)
        assert result.exit_code == 1 and message in result.output, result.output


def _append_many(root: str, ref: str, worker: int) -> None:
    reg = Registry(root)
    manifest = reg.resolve(ref)
    for i in range(25):
        records = [evals.new_record(manifest, "accuracy", worker + i / 100, i, {"file": "f", "sha256": "s", "rows": 1},
                                    {}, {"worker": worker}) for _ in range(2)]
        evals.append(reg.root, manifest, records)


def test_concurrent_appends_lose_nothing(pushed, hub_home):  # noqa: F811
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(hub_home), "ia3@1.0.0", w)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    records = evals.read(hub_home, Registry().resolve("ia3"))
    assert len(records) == len({r["id"] for r in records}) == 4 * 25 * 2
    assert sorted(r["n"] for r in records if r["settings"]["worker"] == 3) == sorted(list(range(25)) * 2)


def test_compare_shows_metrics_side_by_side_and_the_examples_that_differ(base, pushed, tmp_path):  # noqa: F811
    from runtime.eval_cli import Evaluation

    rng = random.Random(3)
    rows = [{"prompt": "".join(rng.choice("abcdef") for _ in range(4)), "completion": rng.choice(["gh", "ij"])}
            for _ in range(8)]
    path = tmp_path / "cmp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = hub("compare", "lora", "ia3", "--data", str(path), "--metric", "loss", "--metric", "contains",
                 "--max-new-tokens", "4", "--show", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()

    run = Evaluation(Registry(), ["lora", "ia3"], str(base), with_base=False)
    loss_a, loss_b = run.run(path, "loss")
    gen_a, gen_b = run.run(path, "contains", max_new_tokens=4)
    assert lines[0].split() == ["METRIC", "lora@1.0.0", "ia3@1.0.0"]
    winner = "lora@1.0.0" if loss_a.value < loss_b.value else "ia3@1.0.0"
    assert lines[1] == f"loss      {loss_a.value:.4f}  {loss_b.value:.4f}  (better: {winner})"
    assert lines[2].startswith(f"contains  {gen_a.value:.4f}  {gen_b.value:.4f}  (better: ")

    gaps = sorted(((abs(x["loss"] - y["loss"]), i) for i, (x, y) in enumerate(zip(loss_a.examples, loss_b.examples),
                                                                               start=1)), reverse=True)
    at = lines.index("loss: 8 of 8 examples differ; the 3 largest:")
    assert [int(line.split()[0][1:]) for line in lines[at + 1: at + 4]] == [i for _, i in gaps[:3]]

    differ = [i for i, (x, y) in enumerate(zip(gen_a.examples, gen_b.examples), start=1) if x["reply"] != y["reply"]]
    assert differ, "the two adapters' greedy replies should differ somewhere"
    at = next(i for i, line in enumerate(lines) if line.startswith("contains: "))
    assert lines[at].startswith(f"contains: {len(differ)} of 8 examples differ")
    shown = lines[at + 1: at + 1 + min(3, len(differ))]
    assert [int(line.split()[0][1:]) for line in shown] == differ[:3]
    reply = json.dumps(gen_a.examples[differ[0] - 1]["reply"])
    assert reply in shown[0]

    same = hub("compare", "lora", "lora@1.0.0", "--data", str(path))
    assert same.exit_code == 1 and "are the same version" in same.output
    gone = hub("eval", "lora", "--data", str(path), "--server", "127.0.0.1:1")
    assert gone.exit_code == 1 and len(gone.output.strip().splitlines()) == 1 and "127.0.0.1:1" in gone.output


def test_eval_on_a_running_server_gives_the_in_process_numbers(registry, start_server, served_base, tmp_path):
    from runtime.eval_cli import Evaluation

    server, _ = start_server()
    rng = random.Random(4)
    rows = [{"prompt": "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))),
             "completion": "".join(rng.choice("ijklm") for _ in range(rng.randint(1, 3)))} for _ in range(6)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refs = ["lora0", "ia3", "prompt-tuning", "bitfit", "bottleneck"]
    local = Evaluation(registry, refs, str(served_base))
    for metric in ("loss", "contains"):
        want = {o.ref: o for o in local.run(path, metric, max_new_tokens=5)}
        result = hub("eval", *refs, "--data", str(path), "--metric", metric, "--max-new-tokens", "5",
                     "--server", server.address, "--registry", str(registry.root), "--batch-size", "4", "--json")
        assert result.exit_code == 0, result.output
        got = {r["ref"]: r for r in json.loads(result.stdout)}
        assert list(got) == list(want)
        for ref, o in want.items():
            assert got[ref]["n"] == o.n
            assert got[ref]["value"] == pytest.approx(o.value, rel=1e-4, abs=1e-6), (metric, ref)
    record = evals.read(registry.root, registry.resolve("lora0"))[-1]
    assert record["settings"]["server"] == server.address and record["base_model"]["fingerprint"]

    other = Registry(tmp_path / "other")  # another registry's content under a name the server serves
    other.push(registry.materialize(registry.resolve("ia3")), "lora0", "1.0.0", base_model=str(served_base))
    result = hub("eval", "lora0", "--data", str(path), "--server", server.address, "--registry", str(other.root))
    assert result.exit_code == 1 and "the server serves lora0@1.0.0 with sha256" in result.output
    assert evals.read(other.root, other.resolve("lora0")) == []


def test_a_datasets_folder_evaluates_as_its_jsonl(data, pushed, tmp_path):  # noqa: F811
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    folder = tmp_path / "val-ds"
    datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in ("prompt", "completion", "messages")}) \
        .save_to_disk(str(folder))
    assert evaluated("lora", "--data", str(folder)) == evaluated("lora", "--data", str(data))
    [on_folder, on_file] = show("lora")["evaluations"]
    assert on_folder["dataset"]["file"] == "val-ds" and on_folder["dataset"]["rows"] == on_file["dataset"]["rows"]


def test_shared_choices_score_as_the_same_questions_written_out(pushed, tmp_path):  # noqa: F811
    rng = random.Random(5)
    choices = ["gh", "ij", "k"]
    rows = [{"prompt": "".join(rng.choice("abcdef") for _ in range(4)), "completion": rng.choice(choices)}
            for _ in range(10)]
    short, full = tmp_path / "short.jsonl", tmp_path / "full.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full.write_text("".join(json.dumps({"prompt": r["prompt"], "choices": choices,
                                        "answer": choices.index(r["completion"])}) + "\n" for r in rows))
    assert evaluated("lora", "ia3", "--data", str(short), "--metric", "accuracy", "--choices", "gh, ij,k") == \
        evaluated("lora", "ia3", "--data", str(full), "--metric", "accuracy")

    short.write_text(short.read_text() + json.dumps({"prompt": "a", "completion": "zz"}) + "\n")
    bad = hub("eval", "lora", "--data", str(short), "--metric", "accuracy", "--choices", "gh,ij,k")
    assert bad.exit_code == 1 and "line 11 (the completion 'zz' is none of --choices gh, ij, k)" in bad.output
    bad = hub("eval", "lora", "--data", str(full), "--metric", "loss", "--choices", "gh,ij")
    assert bad.exit_code == 1 and "--choices takes two or more" in bad.output
