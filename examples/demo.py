"""`make demo`: the main job. For now: the default base model answers a chat prompt."""
from __future__ import annotations

import time

from hub import basemodel


def main() -> None:
    print(f"== loading the default base model ({basemodel.DEFAULT_BASE_MODEL})")
    t = time.perf_counter()
    model, tokenizer = basemodel.load()
    print(f"   loaded in {time.perf_counter() - t:.1f} s")
    for prompt in ["What is the capital of France?", "Give me one tip for writing clear code."]:
        print(f"\n>> {prompt}")
        print(basemodel.chat_reply(model, tokenizer, prompt, max_new_tokens=48))


if __name__ == "__main__":
    main()
