"""What a family's generate hook is built from: the engine's stream, the tokens that end an answer,
the family's own transformers batch code, and its answer clean-up. Plugins state these; this runs them.
"""

from __future__ import annotations

from typing import Callable, Iterable


def generate(engine, requests: Iterable, *, stop_tokens: tuple = (), hf_batch: Callable | None = None,
             clean: Callable | None = None):
    """Results for `requests` as they finish.

    `stop_tokens`: token strings that end an answer besides the checkpoint's own end tokens.
    `hf_batch(engine, requests)`: one transformers batch, for checkpoints that bring their own
    generation code (the core still groups, sizes and splits the batches).
    `clean(request, text)`: the prediction recorded for a generated text.
    """
    batch = None
    if hf_batch is not None and engine.name == "hf":
        def batch(group):
            return hf_batch(engine, group)
    if clean is None:
        yield from engine.generate(requests, stop_tokens=stop_tokens, batch=batch)
        return
    asked = {}

    def remembered():
        for request in requests:
            asked[request.key] = request
            yield request

    for result in engine.generate(remembered(), stop_tokens=stop_tokens, batch=batch):
        request = asked.pop(result.key, None)
        if result.ok and request is not None:
            result.text = clean(request, result.text)
        yield result


def parts(message: list[dict], max_images: int, image: Callable = lambda part: part["image"]):
    """A VLMEvalKit message as ([(kind, text)], images): text parts and image slots in order, the
    images past `max_images` left out with their slots (as vLLM's limit_mm_per_prompt requires)."""
    content, images = [], []
    for part in message:
        if part["type"] == "image":
            if len(images) < max_images:
                images.append(image(part))
                content.append(("image", ""))
        elif part["type"] == "text":
            content.append(("text", part["value"]))
    return content, images


def last_boxed(text: str) -> str:
    """VLMEvalKit's `post_process` option of several model classes: what the last \\boxed{...}
    holds, braces balanced (to the end of the text when unclosed); a text with no \\boxed{ is kept whole."""
    tail = text.split("\\boxed{")[-1]
    depth = 1
    for i, char in enumerate(tail):
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return tail[:i]
    return tail
