"""Soak: many clients at once over every technique against a small batch and a small adapter budget.

Rows join and leave every few steps (prompts of different widths, soft prompts), adapters are evicted to host
memory and to disk and loaded again, requests wait for device room, streams are cancelled mid-way and short
deadlines pass. Greedy decoding makes every answer checkable: a request that completes gets the first
`max_new_tokens` of what the same prompt and adapters generate alone; every other request ends CANCELLED or
DEADLINE_EXCEEDED; afterwards nothing is held, nothing waits and the budget holds. The random choices are
seeded; which requests meet which in a batch is up to the machine, and every outcome above is checked.
"""
from __future__ import annotations

import random
import threading

import grpc

from server_support import *  # noqa: F401,F403
from server_support import ADAPTER_MIXES, wait_until

from hub.artifact import read_adapter

PROMPTS = ("Hi", "Hello there, adapters!", "A longer prompt, wider than the others in the batch: it pads them.")
KINDS = {**ADAPTER_MIXES, "lora1": dict(adapters=["lora1"]), "lora2": dict(adapters=["lora2"])}
LONGEST = 16  # new tokens of the reference answers
CLIENTS, REQUESTS_EACH = 8, 8
ENDED = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def _bytes(server, registry, name: str) -> int:
    return server.engine.weights_bytes(read_adapter(registry.materialize(registry.resolve(name))))


def _client_run(client, references: dict, seed: int, failures: list, outcomes: list) -> None:
    """One client's requests, one after another; a wrong answer or an unexpected error lands in `failures`."""
    rng = random.Random(seed)
    for _ in range(REQUESTS_EACH):
        kind, prompt = rng.choice(sorted(KINDS)), rng.choice(PROMPTS)
        expected = references[kind, prompt]
        n = rng.randint(1, LONGEST)
        how = rng.choice(("unary", "stream", "stream", "cancel", "deadline"))
        label = f"{kind} / {prompt[:12]!r} / {how} / max_new_tokens={n}"
        try:
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


def test_many_clients_every_technique_small_batch_small_budget(start_server, registry):
    server, client = start_server(max_new_tokens=64)
    references = {(kind, prompt): list(client.generate(prompt, max_new_tokens=LONGEST, **kwargs).token_ids)
                  for kind, kwargs in KINDS.items() for prompt in PROMPTS}
    assert len({tuple(v) for v in references.values()}) > len(references) // 2  # the adapters change the answers
    # The largest request (lora1 + lora2) fits the budget alone; the host tier holds about one LoRA more.
    budget = _bytes(server, registry, "lora1") + _bytes(server, registry, "lora2")
    server, client = start_server(max_new_tokens=64, max_batch_size=3, adapter_memory=budget,
                                  host_adapter_memory=_bytes(server, registry, "lora3"))
    failures: list[str] = []
    outcomes: list[str] = []
    threads = [threading.Thread(target=_client_run, args=(client, references, seed, failures, outcomes))
               for seed in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, "\n".join(failures)
    assert len(outcomes) == CLIENTS * REQUESTS_EACH and "OK" in outcomes
    wait_until(lambda: server.scheduler.load() == (0, 0), "the batch and the queue emptied")
    wait_until(lambda: all(e.in_use == 0 for e in server.pool.entries()), "every adapter let go")
    assert server.metrics.adapters_waiting._value.get() == 0
    assert server.pool.device_used() <= budget
    assert server.metrics.evictions.labels(tier="device")._value.get() > 0  # the budget was really small
    for kind, kwargs in KINDS.items():  # still serving, still right
        assert list(client.generate(PROMPTS[1], max_new_tokens=LONGEST, **kwargs).token_ids) == references[kind, PROMPTS[1]]
