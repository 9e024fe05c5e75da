"""An adapter's own chat template: PEFT folders trained on a chat format may ship `chat_template.jinja` or a
`tokenizer_config.json` with `chat_template`; chat requests naming that adapter are rendered with it.

A template is checked when it is pushed (it must compile and render one user message), so a broken
one is refused at the registry with one line instead of failing every chat request that names it.
"""
from __future__ import annotations

import json
from typing import Callable

from hub.artifact import ArtifactError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
# one user message: what every chat template takes (some refuse a system turn or turns that do not alternate)
_PROBE = [{"role": "user", "content": "Hi"}]


def chat_template(files: set[str], read: Callable[[str], bytes]) -> str | None:
    """The template among an adapter's files (`read(name)` gives a file's bytes): chat_template.jinja, else
    tokenizer_config.json's `chat_template` (its `default` one where it names several); None without one."""
    if TEMPLATE_FILE in files:
        return read(TEMPLATE_FILE).decode("utf-8")
    if TOKENIZER_CONFIG not in files:
        return None
    try:
        template = json.loads(read(TOKENIZER_CONFIG)).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ArtifactError(f"{TOKENIZER_CONFIG} is not a JSON object: {e}") from None
    if isinstance(template, list):  # [{name, template}, ...], as transformers saves several
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise ArtifactError(f"{TOKENIZER_CONFIG}: `chat_template` must be a template text")
    return template


def check_template(template: str) -> None:
    """ArtifactError (one line) unless the template compiles and renders one user message, with the
    renderer transformers' apply_chat_template uses (its sandbox, globals and extensions)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        render_jinja_template([_PROBE], chat_template=template, add_generation_prompt=True, bos_token="<s>",
                              eos_token="</s>")
    except Exception as e:  # a syntax error, an undefined filter, the template's own raise_exception
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"the adapter's chat template does not render: {first}") from None
