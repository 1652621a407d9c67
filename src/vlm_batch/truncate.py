"""`--truncate`: a prompt longer than the model's context has its text cut to fit, instead of failing.

Off by default, so prompts stay VLMEvalKit's. The cut is made in the VLMEvalKit message, before the
family builds its prompt: in its longest text part, from the middle, so the images, the start and
the end (a question's options and instruction) are kept. Tokens are counted by the checkpoint's
own processor, images included, which is what both engines count.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)
MARK = " ... "        # where text was cut
HEAD = 0.25           # the share of the kept text taken from the start; the rest comes from the end
TRIES = 4


class TooLong(ValueError):
    pass


def context_of(card) -> int | None:
    """The tokens a request may hold: vLLM's max_model_len and the model's positions, the smaller."""
    from .memory import model_config, text_config

    limits = [card.vllm_args.get("max_model_len")]
    try:
        limits.append(text_config(model_config(card)).get("max_position_embeddings"))
    except (OSError, KeyError, ValueError):
        pass
    limits = [int(x) for x in limits if x]
    return min(limits) if limits else None


@functools.lru_cache(maxsize=4)
def _processor(path: str, trust_remote_code: bool):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


class Fit:
    """Prepares a message into a Request that fits the context, cutting its text when it must."""

    def __init__(self, card, trust_remote_code: bool = False):
        self.card, self.trust_remote_code = card, trust_remote_code
        self.context = context_of(card)

    def tokens(self, request) -> int:
        processor = _processor(self.card.path(), self.trust_remote_code)
        kwargs = {"text": [request.prompt], "return_tensors": None}
        if request.images:
            kwargs["images"] = [request.images]
        return len(processor(**kwargs)["input_ids"][0])

    def __call__(self, prepare, message: list[dict]):
        """`prepare(message)` -> Request, cut to fit; the Request's `truncated` says from and to."""
        request = prepare(message)
        if not self.context:
            return request
        budget = self.context - min(request.max_new_tokens, self.context // 4)   # room for an answer
        first = n = self.tokens(request)
        tokenizer = getattr(_processor(self.card.path(), self.trust_remote_code), "tokenizer", None)
        for _ in range(TRIES):
            if n <= budget:
                break
            message = cut(message, n - budget, tokenizer)
            request = prepare(message)
            n = self.tokens(request)
        if n > budget:
            raise TooLong(f"prompt has {first} tokens and {n} after cutting its text; the context "
                          f"({self.context}, less {self.context - budget} for the answer) is too small")
        if n != first:
            request.truncated = (first, n)
        return request


def cut(message: list[dict], over: int, tokenizer) -> list[dict]:
    """The message with `over` (and a few more) tokens cut from the middle of its longest text part."""
    texts = [i for i, p in enumerate(message) if p["type"] == "text"]
    if not texts:
        raise TooLong("the prompt is too long and has no text to cut (its images alone exceed the context)")
    i = max(texts, key=lambda j: len(message[j]["value"]))
    ids = tokenizer(message[i]["value"], add_special_tokens=False)["input_ids"]
    keep = len(ids) - over - len(tokenizer(MARK, add_special_tokens=False)["input_ids"]) - 2
    if keep <= 0:
        raise TooLong(f"the prompt is {over} tokens too long and its longest text has only {len(ids)}")
    head = int(keep * HEAD)
    text = tokenizer.decode(ids[:head]) + MARK + tokenizer.decode(ids[len(ids) - (keep - head):])
    return [dict(p, value=text) if j == i else p for j, p in enumerate(message)]
