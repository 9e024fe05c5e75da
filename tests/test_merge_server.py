"""Per-request merges through the real gRPC server (COMPOSITION_MODE_MERGE): equal to PEFT's own merge,
built once per exact parents + parameters, counted against the adapter memory budget, batched with others."""
from __future__ import annotations

import threading

import grpc
import pytest
import torch

from server_support import CONTEXT, DEVICE, frozen, served_model, wait_until

from hub.artifact import read_adapter
from hub.merge import merge
from hub.merge_spec import MergeSpec
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

PROMPT = "Merge these, please."


def merge_request(client, adapters, tokens: int = 10, **options) -> pb.GenerateRequest:
    request = client.generate_request(PROMPT, adapters=adapters, max_new_tokens=tokens)
    request.mode = pb.COMPOSITION_MODE_MERGE
    request.merge.CopyFrom(pb.MergeOptions(**options))
    return request


def ask(client, request):
    return client.stub.Generate(request, timeout=120)


def peft_merged(served_base, served_adapters, names, weights, **kwargs):
    """(PEFT model with the weighted merge of `names` active, tokenizer)."""
    from peft import PeftModel

    # Merged on the CPU, as the server merges: svd_clamp's quantile depends on the signs the SVD gives its
    # singular vectors, and cuSOLVER's differ from LAPACK's (PEFT's merge on a GPU is another adapter).
    model, tokenizer = served_model(served_base, device="cpu")
    peft = PeftModel.from_pretrained(model, str(served_adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(served_adapters[name]), adapter_name=name)
    peft.add_weighted_adapter(names, weights, "merged", **kwargs)
    peft.set_adapter("merged")
    return peft.to(DEVICE).eval(), tokenizer


def peft_merged_generate(peft, tokenizer, tokens: int) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(DEVICE)
    with torch.inference_mode():
        out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                            do_sample=False, pad_token_id=0, eos_token_id=2)
    return [t for t in out[0, ids.shape[1]:].tolist() if t != 2]


def peft_logprobs(peft, tokenizer) -> torch.Tensor:
    """log P(token i | tokens before it) for PROMPT's tokens after the first, as Score reports them."""
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(DEVICE)
    with torch.inference_mode():
        logits = peft(input_ids=ids).logits[0, :-1].float().cpu()
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None].cpu()).squeeze(-1)


def merge_logprobs(client, adapters, **options) -> torch.Tensor:
    """Score's log-probabilities of PROMPT under the per-request merge of `adapters`."""
    return logprobs(client.score(PROMPT, adapters=adapters, mode="merge", merge=pb.MergeOptions(**options)))


def logprobs(reply) -> torch.Tensor:
    return torch.tensor(list(reply.logprobs))


@pytest.mark.parametrize("options,peft_kwargs", [
    (dict(method="cat"), dict(combination_type="cat")),
    (dict(method="ties_svd", density=0.5, svd_rank=6), dict(combination_type="ties_svd", density=0.5, svd_rank=6)),
    (dict(method="svd", svd_rank=4, svd_clamp=0.9), dict(combination_type="svd", svd_rank=4, svd_clamp=0.9)),
])
def test_merge_mode_generates_as_peft_merged_adapter(start_server, served_base, served_adapters, options, peft_kwargs):
    _, client = start_server()
    reply = ask(client, merge_request(client, [("lora0", 0.7), ("lora1", -0.4)], 12, **options))
    peft, tokenizer = peft_merged(served_base, served_adapters, ["lora0", "lora1"], [0.7, -0.4], **peft_kwargs)
    assert list(reply.token_ids) == peft_merged_generate(peft, tokenizer, 12)
    scored = merge_logprobs(client, [("lora0", 0.7), ("lora1", -0.4)], **options)
    assert torch.allclose(scored, peft_logprobs(peft, tokenizer), atol=1e-5, rtol=0)
    assert [(a.ref, round(a.weight, 4)) for a in reply.adapters] == [("lora0@1.0.0", 0.7), ("lora1@1.0.0", -0.4)]
    assert all(a.sha256 for a in reply.adapters)  # the exact parents are reported


def test_built_once_per_parents_and_parameters(start_server):
    server, client = start_server()
    first = ask(client, merge_request(client, ["lora2", "lora3"], method="dare_ties_svd", density=0.5, seed=7))
    again = ask(client, merge_request(client, ["lora2", "lora3"], method="dare_ties_svd", density=0.5, seed=7))
    assert first.token_ids == again.token_ids
    merged = [a for a in client.list_adapters().adapters if a.ref.startswith("merge:")]
    assert len(merged) == 1 and merged[0].requests_served == 2 and merged[0].technique == "lora"
    assert server.metrics.loads.labels(source="disk")._value.get() == 1  # built once, then a device hit
    ask(client, merge_request(client, ["lora2", "lora3"], method="dare_ties_svd", density=0.5, seed=8))
    assert len([a for a in client.list_adapters().adapters if a.ref.startswith("merge:")]) == 2  # another seed
    assert server.metrics.loads.labels(source="disk")._value.get() == 2


def test_counted_against_the_adapter_memory_budget(start_server, registry):
    parents = [read_adapter(registry.materialize(registry.resolve(r))) for r in ("lora0@1.0.0", "lora1@1.0.0")]
    size = merge(parents, MergeSpec("cat", (1.0, 1.0))).nbytes  # float32 on a float32 server
    server, client = start_server(adapter_memory=size)
    ask(client, merge_request(client, ["lora0", "lora1"], method="cat"))
    listed = client.list_adapters()
    entry = next(a for a in listed.adapters if a.ref.startswith("merge:"))
    assert entry.tier == pb.TIER_DEVICE and entry.size_bytes == size == listed.device_used_bytes
    _, small = start_server(adapter_memory=size - 1)
    with pytest.raises(grpc.RpcError) as e:
        ask(small, merge_request(small, ["lora0", "lora1"], method="cat"))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory budget" in e.value.details()


def test_merged_adapter_batches_with_other_requests(start_server):
    server, client = start_server()
    requests = {
        "merge": merge_request(client, [("lora0", 0.5), ("lora2", 0.5)], method="ties_svd", density=0.7),
        "lora0": client.generate_request(PROMPT, adapters=["lora0"], max_new_tokens=10),
        "stack": client.generate_request(PROMPT, adapters=[("lora0", 0.5), ("lora2", 0.5)], max_new_tokens=10),
        "base": client.generate_request(PROMPT, max_new_tokens=10),
    }
    alone = {name: list(ask(client, r).token_ids) for name, r in requests.items()}
    assert alone["merge"] != alone["base"]
    together: dict[str, list[int]] = {}
    threads = [threading.Thread(target=lambda n=n, r=r: together.__setitem__(n, list(ask(client, r).token_ids)))
               for n, r in requests.items()]
    with frozen(server):
        for t in threads:
            t.start()
        wait_until(lambda: server.scheduler.queue_depths()[1] == len(requests), "all requests queued")
    for t in threads:
        t.join()
    assert together == alone


def test_merges_of_parents_never_loaded_leave_no_marks_beyond_the_entries(start_server):
    """A per-request merge reads its parents without loading them: the pool's "already checked" marks stay
    within its entries, so many distinct merges over many parents do not grow the server's state."""
    server, client = start_server()
    for weights in ((0.5, 0.5), (0.3, 0.7)):
        ask(client, merge_request(client, [("lora0", weights[0]), ("lora2", weights[1])], method="cat"))
    entries = {e.key for e in server.pool.entries()}
    assert len([k for k in entries if k.startswith("merge:")]) == 2
    assert not {"lora0@1.0.0", "lora2@1.0.0"} & entries
    assert {key for key, _sha256 in server.pool._verified} <= entries


@pytest.mark.parametrize("adapters,options,message", [
    (["lora0", "lora1"], dict(method="ties"), "needs a density"),
    (["lora0", "lora1"], dict(method="ties", density=0.5, majority_sign="median"), "majority sign"),
    (["lora0", "lora1"], dict(method=""), "merge.method"),
    (["lora0", "ia3"], dict(method="linear"), "different techniques"),
    (["lora0", "lora1"], dict(method="linear"), "one rank"),  # found when the parents' tensors are read
    ([], dict(method="linear"), "at least one adapter"),
    (["lora0", "lora1"], dict(method="svd", svd_clamp=1.5), "svd_clamp is a quantile"),
    (["lora0", "lora1"], dict(method="cat", svd_clamp=0.9), "svd_clamp does not apply"),
])
def test_bad_merge_requests_are_invalid_argument(start_server, adapters, options, message):
    _, client = start_server()
    with pytest.raises(grpc.RpcError) as e:
        ask(client, merge_request(client, adapters, **options))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    assert not [a for a in client.list_adapters().adapters if a.ref.startswith("merge:")]


def test_foreign_parent_is_refused(start_server):
    _, client = start_server()
    with pytest.raises(grpc.RpcError) as e:
        ask(client, merge_request(client, ["lora0", "foreign"], method="cat"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cli_generate_and_score_with_merge(start_server):
    import json

    from typer.testing import CliRunner

    from hub.cli import app

    server, client = start_server()
    runner = CliRunner()
    args = ["--server", server.address, "-a", "lora0:0.7", "-a", "lora1:0.3", "--merge", "ties_svd,density=0.5"]
    result = runner.invoke(app, ["generate", PROMPT, *args, "--max-new-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.output)
    direct = ask(client, merge_request(client, [("lora0", 0.7), ("lora1", 0.3)], 8, method="ties_svd", density=0.5))
    assert [int(t) for t in reply["token_ids"]] == list(direct.token_ids)
    assert [a["ref"] for a in reply["adapters"]] == ["lora0@1.0.0", "lora1@1.0.0"]
    scored = runner.invoke(app, ["score", PROMPT, *args])
    assert scored.exit_code == 0 and scored.output.splitlines()[-1].startswith("total\t")
    for bad, message in (("ties,density=x", "takes a float"), ("density=0.5", "starts with the method"),
                         ("ties,rank=2", "expected one of")):
        result = runner.invoke(app, ["generate", PROMPT, "--server", server.address, "-a", "lora0", "--merge", bad])
        assert result.exit_code != 0 and message in result.output, result.output
    both = runner.invoke(app, ["generate", PROMPT, "--server", server.address, "--mode", "average", "--merge", "cat"])
    assert both.exit_code != 0 and "--merge replaces --mode" in both.output


def test_parse_merge_options():
    from runtime.cli import parse_merge_options

    options = parse_merge_options("dare_ties_svd, density=0.25, majority_sign=frequency, svd_rank=4, svd_clamp=0.5, seed=9")
    assert options == pb.MergeOptions(method="dare_ties_svd", density=0.25, majority_sign="frequency", svd_rank=4,
                                      svd_clamp=0.5, seed=9)
    assert parse_merge_options("cat") == pb.MergeOptions(method="cat")


def _second_adapter(technique: str, folder):
    """Another adapter of the technique, for the served tiny base (different weights)."""
    from peft import IA3Config, PromptTuningConfig

    from helpers import save_bitfit_adapter, save_bottleneck_adapter, save_peft_adapter, tiny_llama

    base = tiny_llama(max_position_embeddings=CONTEXT)
    if technique == "ia3":
        return save_peft_adapter(base, IA3Config(target_modules=["k_proj", "down_proj"],
                                                 feedforward_modules=["down_proj"]), folder, seed=21)
    if technique == "prompt_tuning":
        return save_peft_adapter(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), folder, seed=22)
    if technique == "bitfit":
        return save_bitfit_adapter(folder, {"model.layers.0.self_attn.o_proj": 0.005 * torch.randn(64),
                                            "model.layers.1.mlp.down_proj": 0.005 * torch.randn(64)})
    return save_bottleneck_adapter(folder, seed=23)


@pytest.mark.parametrize("technique,method,weights", [
    ("ia3", "linear", (0.6, 0.4)), ("bitfit", "linear", (1.0, -0.5)), ("bottleneck", "linear", (1.0, 3.0)),
    ("prompt_tuning", "cat", (1.0, 1.0)),
])
def test_other_techniques_merge_as_the_offline_merge(start_server, registry, served_base, tmp_path,
                                                     technique, method, weights):
    """A per-request merge answers exactly as the same merge made offline (hub.merge), pushed and served."""
    from hub.artifact import write_adapter

    first = technique.replace("_", "-")
    registry.push(_second_adapter(technique, tmp_path / "second"), "second", "1.0.0", base_model=str(served_base))
    parents = [read_adapter(registry.materialize(registry.resolve(r))) for r in (f"{first}@1.0.0", "second@1.0.0")]
    offline = merge(parents, MergeSpec(method, weights))
    registry.push(write_adapter(offline, tmp_path / "offline"), "offline", "1.0.0", base_model=str(served_base))
    _, client = start_server()
    reply = ask(client, merge_request(client, [(first, weights[0]), ("second", weights[1])], method=method))
    served = client.generate(PROMPT, adapters=["offline"], max_new_tokens=10)
    base = client.generate(PROMPT, max_new_tokens=10)
    assert list(reply.token_ids) == list(served.token_ids)
    assert reply.token_ids != base.token_ids
    scored = merge_logprobs(client, [(first, weights[0]), ("second", weights[1])], method=method)
    assert torch.allclose(scored, logprobs(client.score(PROMPT, adapters=["offline"])), atol=1e-5, rtol=0)


def test_cat_of_adapters_touching_different_modules(start_server, registry, served_base, served_adapters, tmp_path):
    """Modules only some parents touch get a smaller rank (rank_pattern/alpha_pattern): served as PEFT merges."""
    from peft import LoraConfig

    from helpers import save_peft_adapter, tiny_llama

    folder = save_peft_adapter(tiny_llama(max_position_embeddings=CONTEXT),
                               LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]), tmp_path / "q", seed=31)
    registry.push(folder, "qo", "1.0.0", base_model=str(served_base))
    _, client = start_server()
    reply = ask(client, merge_request(client, [("lora0", 0.8), ("qo", 1.5)], 12, method="cat"))
    peft, tokenizer = peft_merged(served_base, {**served_adapters, "qo": folder}, ["lora0", "qo"], [0.8, 1.5],
                                  combination_type="cat")
    assert list(reply.token_ids) == peft_merged_generate(peft, tokenizer, 12)
    scored = merge_logprobs(client, [("lora0", 0.8), ("qo", 1.5)], method="cat")
    assert torch.allclose(scored, peft_logprobs(peft, tokenizer), atol=1e-5, rtol=0)


def test_parents_naming_one_base_by_other_ids_merge(start_server, registry, served_base, served_adapters, tmp_path):
    """The served base's fingerprint decides, as for `hub merge`: not the ids in the parents' configs."""
    import json
    import shutil

    for name, base_id in (("lora0", "/home/me/.cache/hub/bases/tiny"), ("lora1", "org/tiny")):
        folder = shutil.copytree(served_adapters[name], tmp_path / name)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_id}))
        registry.push(folder, f"{name}-renamed", "1.0.0", base_model=str(served_base))
    _, client = start_server()
    renamed = ask(client, merge_request(client, [("lora0-renamed", 0.7), ("lora1-renamed", -0.4)], 12, method="cat"))
    same = ask(client, merge_request(client, [("lora0", 0.7), ("lora1", -0.4)], 12, method="cat"))
    assert list(renamed.token_ids) == list(same.token_ids)
    assert torch.equal(merge_logprobs(client, [("lora0-renamed", 0.7), ("lora1-renamed", -0.4)], method="cat"),
                       merge_logprobs(client, [("lora0", 0.7), ("lora1", -0.4)], method="cat"))
