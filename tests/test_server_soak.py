"""Soak: many clients at once over every technique against a small batch and a small adapter budget.

Rows join and leave every few steps (prompts of different widths, soft prompts), adapters are evicted to host
memory and to disk and loaded again, requests wait for device room, streams are cancelled mid-way, short
deadlines pass, stop strings end answers mid-way, Score and per-request merges run between decode steps, an
admin client loads and unloads adapters, and another writer pushes new versions under a tag that requests name.
Greedy decoding makes every answer checkable: a request that completes gets the first `max_new_tokens` of what
the same prompt and adapters generate alone (with a stop string: the same tokens and text as alone; under the
moving tag: what the version it reports generates alone), and a score equals the score alone; every other
request ends CANCELLED or DEADLINE_EXCEEDED; the admin calls end OK or with the refusal their moment explains.
Afterwards nothing is held, nothing waits and the budget holds. The random choices are seeded; which requests
meet which in a batch is up to the machine, and every outcome above is checked.
"""
from __future__ import annotations

import random
import threading

import grpc
import pytest

from server_support import ADAPTER_MIXES, device_bytes, wait_until

from hub.registry import Registry
from runtime.proto.adapterhub.v1 import runtime_pb2 as pb

PROMPTS = ("Hi", "Hello there, adapters!", "A longer prompt, wider than the others in the batch: it pads them.")
KINDS = {**ADAPTER_MIXES, "lora1": dict(adapters=["lora1"]), "lora2": dict(adapters=["lora2"]),
         "merge": dict(adapters=["lora0", ("lora1", 0.5)], mode="merge",
                       merge=pb.MergeOptions(method="ties_svd", density=0.5, svd_rank=8))}
LONGEST = 16  # new tokens of the reference answers
CLIENTS, REQUESTS_EACH = 8, 8
PUSHES = 12  # new versions of `tagged` pushed during the run
ENDED = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
# What an admin call may meet mid-traffic: the adapter in use (unload) or not loaded (unload).
ADMIN_REFUSALS = {"unload": (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), "load": ()}


def _scores(client, prompt: str, kwargs: dict) -> list[float]:
    return list(client.score(prompt, **kwargs).logprobs)


def _stopped(client, prompt: str, kwargs: dict, stop: str) -> tuple[list[int], str, str]:
    reply = client.generate(prompt, max_new_tokens=LONGEST, stop=[stop], **kwargs)
    return list(reply.token_ids), reply.text, reply.finish_reason


def _client_run(client, references: dict, scores: dict, stops: dict, seed: int, failures: list,
                outcomes: list) -> None:
    """One client's requests, one after another; a wrong answer or an unexpected error lands in `failures`."""
    rng = random.Random(seed)
    for _ in range(REQUESTS_EACH):
        kind, prompt = rng.choice(sorted(KINDS)), rng.choice(PROMPTS)
        expected = references[kind, prompt]
        n = rng.randint(1, LONGEST)
        how = rng.choice(("unary", "stream", "stream", "cancel", "deadline", "score", "stop"))
        how = "unary" if how == "stop" and (kind, prompt) not in stops else how
        label = f"{kind} / {prompt[:12]!r} / {how} / max_new_tokens={n}"
        try:
            if how == "stop":  # a stop string the answer reaches mid-way: the same cut as alone
                stop, alone = stops[kind, prompt]
                got = _stopped(client, prompt, KINDS[kind], stop)
                outcomes.append("OK")
                if got != alone:
                    failures.append(f"{label}: stop {stop!r}: got {got}, alone it is {alone}")
                continue
            if how == "score":
                got = _scores(client, prompt, KINDS[kind])
                outcomes.append("OK")
                if max(abs(a - b) for a, b in zip(got, scores[kind, prompt], strict=True)) > 1e-5:
                    failures.append(f"{label}: scores {got} differ from alone {scores[kind, prompt]}")
                continue
            if how == "unary":
                got = list(client.generate(prompt, max_new_tokens=n, **KINDS[kind]).token_ids)
            elif how == "deadline":  # may finish first or expire while queued, loading, waiting or decoding
                got = list(client.generate(prompt, max_new_tokens=n, timeout=rng.uniform(0.01, 0.3),
                                           **KINDS[kind]).token_ids)
            else:
                stream = client.generate_stream(prompt, max_new_tokens=n, **KINDS[kind])
                got, chunks = [], 0
                for chunk in stream:
                    got += chunk.token_ids
                    chunks += 1
                    if how == "cancel" and chunks == 2:
                        stream.cancel()  # the next read raises CANCELLED
                if how == "cancel" and got != expected[:len(got)]:
                    failures.append(f"{label}: tokens before the cancel {got} are not a prefix of {expected}")
                    continue
        except grpc.RpcError as e:
            if e.code() in ENDED and how in ("cancel", "deadline"):
                outcomes.append(e.code().name)
                continue
            failures.append(f"{label}: {e.code().name}: {e.details()}")
            continue
        outcomes.append("OK")
        if got != expected[:n]:
            failures.append(f"{label}: got {got}, alone it is {expected[:n]}")


def _admin_run(client, seed: int, stop: threading.Event, failures: list, outcomes: list) -> None:
    """Loads and unloads LoRAs while the clients run (each call a moment's snapshot: any refusal it may meet)."""
    rng = random.Random(seed)
    while not stop.is_set():
        action, name = rng.choice(sorted(ADMIN_REFUSALS)), rng.choice(("lora0", "lora1", "lora2", "lora3"))
        try:
            (client.unload_adapter if action == "unload" else client.load_adapter)(name)
            outcomes.append(f"admin {action} OK")
        except grpc.RpcError as e:
            if e.code() not in ADMIN_REFUSALS[action]:
                failures.append(f"admin {action} {name}: {e.code().name}: {e.details()}")
            else:
                outcomes.append(f"admin {action} {e.code().name}")


def _content(version: str) -> str:
    """Which adapter's files the pusher put under `tagged@<version>`: lora0 and lora3 by turns."""
    return ("lora0", "lora3")[int(version.split(".")[0]) % 2]


def _push_version(registry, served_adapters, served_base, number: int) -> None:
    version = f"{number}.0.0"
    registry.push(served_adapters[_content(version)], "tagged", version, base_model=str(served_base))
    registry.tag(f"tagged@{version}", "prod")


def _pusher_run(registry, served_adapters, served_base, stop: threading.Event, failures: list, pushed: list) -> None:
    """Pushes new versions of `tagged` and moves its `prod` tag while the server serves it (another writer): up to
    PUSHES, one every 0.2 s, so the registry stays small and the clients meet several versions."""
    try:
        while len(pushed) < PUSHES and not stop.wait(0.2):
            _push_version(registry, served_adapters, served_base, len(pushed) + 2)
            pushed.append(len(pushed) + 2)
    except Exception as e:  # noqa: BLE001 - reported as a failure of the test
        failures.append(f"pusher: {e!r}")


def _tagged_run(client, references: dict, seed: int, failures: list, outcomes: list) -> None:
    """Requests naming `tagged@prod` while it moves: each answer is that of the version it reports."""
    rng = random.Random(seed)
    for _ in range(REQUESTS_EACH):
        prompt, n, stream = rng.choice(PROMPTS), rng.randint(1, LONGEST), rng.random() < 0.5
        try:
            if stream:
                chunks = list(client.generate_stream(prompt, max_new_tokens=n, adapters=["tagged@prod"]))
                ref, got = chunks[0].adapters[0].ref, [t for c in chunks for t in c.token_ids]
            else:
                reply = client.generate(prompt, max_new_tokens=n, adapters=["tagged@prod"])
                ref, got = reply.adapters[0].ref, list(reply.token_ids)
        except grpc.RpcError as e:
            failures.append(f"tagged@prod / {prompt[:12]!r}: {e.code().name}: {e.details()}")
            continue
        outcomes.append(ref)
        expected = references[_content(ref.split("@")[1]), prompt][:n]
        if got != expected:
            failures.append(f"{ref} / {prompt[:12]!r}: got {got}, alone its files give {expected}")


def test_many_clients_every_technique_small_batch_small_budget(start_server, registry, served_adapters, served_base):
    server, client = start_server(max_new_tokens=64)
    references = {(kind, prompt): list(client.generate(prompt, max_new_tokens=LONGEST, **kwargs).token_ids)
                  for kind, kwargs in KINDS.items() for prompt in PROMPTS}
    scores = {(kind, prompt): _scores(client, prompt, kwargs) for kind, kwargs in KINDS.items() for prompt in PROMPTS}
    stops = {}  # a stop string from the middle of each answer, and what the request with it gets alone
    for (kind, prompt), tokens in references.items():
        stop = server.engine.tokenizer.decode(tokens, skip_special_tokens=True)[3:5]
        if stop:  # (an answer of 3 visible characters or fewer gets no stop request)
            stops[kind, prompt] = stop, _stopped(client, prompt, KINDS[kind], stop)
            assert stops[kind, prompt][1][2] == "stop", (kind, prompt, stop)
    assert len(stops) > len(references) // 2
    assert len({tuple(v) for v in references.values()}) > len(references) // 2  # the adapters change the answers
    # The largest request (lora1 + lora2) fits the budget alone; the host tier holds about one LoRA more.
    budget = device_bytes(server.engine, registry, "lora1") + device_bytes(server.engine, registry, "lora2")
    server, client = start_server(max_new_tokens=64, max_batch_size=3, adapter_memory=budget,
                                  host_adapter_memory=device_bytes(server.engine, registry, "lora3"))
    failures: list[str] = []
    outcomes: list[str] = []
    _push_version(registry, served_adapters, served_base, 1)
    threads = [threading.Thread(target=_client_run, args=(client, references, scores, stops, seed, failures, outcomes))
               for seed in range(CLIENTS)]
    tagged_outcomes: list[str] = []
    threads.append(threading.Thread(target=_tagged_run, args=(client, references, CLIENTS, failures, tagged_outcomes)))
    stop, admin_outcomes, pushed = threading.Event(), [], []
    others = [threading.Thread(target=_admin_run, args=(client, CLIENTS, stop, failures, admin_outcomes)),
              threading.Thread(target=_pusher_run, args=(Registry(registry.root), served_adapters, served_base, stop,
                                                         failures, pushed))]
    for thread in threads + others:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    for thread in others:
        thread.join()
    assert not failures, "\n".join(failures)
    assert len(outcomes) == CLIENTS * REQUESTS_EACH and "OK" in outcomes and admin_outcomes and pushed
    assert len(tagged_outcomes) == REQUESTS_EACH
    wait_until(lambda: server.scheduler.queue_depths() == (0, 0), "the batch and the queue emptied")
    wait_until(lambda: all(e.in_use == 0 for e in server.pool.entries()), "every adapter let go")
    assert server.metrics.adapters_waiting._value.get() == 0
    assert server.pool.device_used() <= budget
    assert server.metrics.evictions.labels(tier="device")._value.get() > 0  # the budget was really small
    for kind, kwargs in KINDS.items():  # still serving, still right
        reply = client.generate(PROMPTS[1], max_new_tokens=LONGEST, **kwargs)
        assert list(reply.token_ids) == references[kind, PROMPTS[1]]
        assert _scores(client, PROMPTS[1], kwargs) == pytest.approx(scores[kind, PROMPTS[1]], abs=1e-5)
