"""The model card: what a plugin knows about one model, and nothing the core could work out itself."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class ModelCard:
    name: str                                # the VLMEvalKit model name users type
    family: str                              # the architecture family, as its plugin names it
    checkpoint: str | Callable[[], str]      # hub id or local path, or a builder for local tiny models
    engines: tuple[str, ...] = ("vllm", "hf")
    vlmeval_name: str | None = None          # whose VLMEvalKit prompt rules apply (default: name)
    vlmeval_class: str = ""                  # or the VLMEvalKit class whose rules apply (a user's checkpoint)
    prompt_attrs: Mapping[str, Any] = field(default_factory=dict)  # what that class's prompt code reads
    max_new_tokens: int = 512
    vllm_args: Mapping[str, Any] = field(default_factory=dict)
    vllm_cpu_args: Mapping[str, Any] = field(default_factory=dict)   # off-GPU overrides (e.g. a dtype)
    generation: Mapping[str, Any] = field(default_factory=dict)  # sampling settings both engines take
    hf_class: str = "AutoModelForImageTextToText"
    trust_remote_code: bool = False          # the checkpoint ships code; the user must opt in
    options: Mapping[str, Any] = field(default_factory=dict)  # plugin-private facts (pixels, limits)
    description: str = ""
    demo: bool = False                       # the embedded default `vlm-batch eval` runs with no --model
    plugin: str = ""                         # the plugin whose hooks serve it (default: the one registering it)
    gpu_only: str = ""                       # why it cannot run without a GPU (e.g. its quantized weights)

    @property
    def prompt_name(self) -> str:
        return self.vlmeval_name or self.name

    def path(self) -> str:
        """The local or hub location of the weights, building a tiny local model on first use."""
        return self.checkpoint() if callable(self.checkpoint) else self.checkpoint

    def with_plugin(self, plugin: str) -> "ModelCard":
        return replace(self, plugin=plugin)


@dataclass(frozen=True)
class Unserved:
    """A VLMEvalKit model of a class a plugin serves that it cannot run, and why (`vlm-batch models --all`)."""
    name: str
    reason: str
    vlmeval_class: str = ""
    plugin: str = ""
    family: str = ""
