"""What travels between the stages: a Request for the engine and the Result it comes back as."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAIL_MSG = "Failed to obtain answer"  # VLMEvalKit's marker for an item it could not answer


@dataclass
class Request:
    prompt: str                    # the model's full prompt text, image placeholders included
    images: list = field(default_factory=list)   # PIL images in placeholder order
    max_new_tokens: int = 512
    index: Any = None              # the dataset row's index (set by the core): names the item
    dataset: str = ""
    prompt_tokens: int = 0         # tokens the model sees, images included; set by whoever counts first
    mm_kwargs: dict = field(default_factory=dict)  # per-request processor arguments
    memory: int = 0                # device bytes it needs (estimate_memory hook), once computed
    position: int = -1             # the row's position in its dataset (set by the core)
    truncated: tuple | None = None  # (tokens before, after) when --truncate cut its text
    rendered: tuple | None = None   # (engine key, vLLM's input; None once sent) where a worker rendered it;
                                   # its `images` are then dropped
    image_count: int = 0           # the images it had before rendering dropped them

    @property
    def shape(self) -> tuple:
        return (self.dataset, self.image_count if self.rendered else len(self.images))

    @property
    def key(self) -> tuple:
        """Names the item across a suite: one model's stream carries rows of several datasets."""
        return (self.dataset, item_key(self.index))


@dataclass
class Result:
    index: Any
    text: str | None = None
    error: str | None = None       # "<cause>" when the item failed; the run goes on
    prompt_tokens: int = 0
    output_tokens: int = 0
    dataset: str = ""              # the request's dataset, copied by the engine
    truncated: tuple | None = None  # its request's text was cut to fit: (tokens before, after)

    @property
    def key(self) -> tuple:
        return (self.dataset, item_key(self.index))

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def prediction(self) -> str:
        """The text VLMEvalKit's files get: the answer, or its failure marker naming the cause."""
        return self.text if self.ok else f"{FAIL_MSG}: {self.error}"

    @classmethod
    def failed(cls, index, exc: BaseException | str, dataset: str = "") -> "Result":
        cause = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        return cls(index=index, error=cause, dataset=dataset)


def item_key(index) -> int | str:
    """One spelling for an item's index, whether it came from pandas, JSON or a pickle."""
    if hasattr(index, "__index__"):          # int, numpy integers
        return int(index)
    if isinstance(index, float) and index.is_integer():
        return int(index)
    text = str(index).strip()
    return int(text) if text.lstrip("-").isdigit() else text
