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

    @property
    def shape(self) -> tuple:
        return (self.dataset, len(self.images))


@dataclass
class Result:
    index: Any
    text: str | None = None
    error: str | None = None       # "<cause>" when the item failed; the run goes on
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def prediction(self) -> str:
        """The text VLMEvalKit's files get: the answer, or its failure marker naming the cause."""
        return self.text if self.ok else f"{FAIL_MSG}: {self.error}"

    @classmethod
    def failed(cls, index, exc: BaseException | str) -> "Result":
        cause = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        return cls(index=index, error=cause)
