"""The transformers engine: batched `generate` with left padding, for models vLLM lacks.

Requests are grouped by shape and by prompt length (so little padding is wasted), sized so a batch
fits the memory budget, and halved on a real out-of-memory by the BatchProcessor.
"""

from __future__ import annotations

import logging
import math

from .collector import BatchCollector, collect
from ..memory import batch_bytes
from .processor import BatchProcessor
from ..request import Result
from . import EngineError, on_gpu, sampling, token_ids

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64


class PromptTooLong(ValueError):
    """Raised for the batch; the processor then retries its items alone, so only the long one fails."""


def length_bucket(tokens: int) -> int:
    """Buckets a factor of sqrt(2) wide: padding inside a batch stays under ~41% of its length."""
    return int(2 * math.log2(max(tokens, 1)))


def default_budget(device) -> int:
    """Bytes batches may use: most of what is free on the GPU, a quarter of free RAM on the CPU."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    import psutil

    return int(psutil.virtual_memory().available * 0.25)


class HFEngine:
    name = "hf"

    def __init__(self, card, *, batch_size: int | None = None, max_batch_memory: int | None = None,
                 trust_remote_code: bool = False, timeout_s: float = 0.1, verbose: bool = False,
                 dtype=None):
        import torch
        import transformers

        self.card = card
        self.device = torch.device("cuda" if on_gpu() else "cpu")
        path = card.path()
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            model_cls = getattr(transformers, card.hf_class)
            self.model = model_cls.from_pretrained(
                path, dtype=dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32),
                trust_remote_code=trust_remote_code).to(self.device).eval()
        except Exception as exc:
            raise EngineError(f"transformers could not load {card.name}: {type(exc).__name__}: {exc}") from exc
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        self.eos = self._checkpoint_eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos)
        text = getattr(self.model.config, "text_config", None) or self.model.config
        self.context = getattr(text, "max_position_embeddings", None)
        self.max_batch = batch_size or DEFAULT_MAX_BATCH
        self.budget = max_batch_memory or default_budget(self.device)
        self.timeout_s = timeout_s
        self.args = {"max_batch": self.max_batch, "budget_bytes": self.budget, "device": str(self.device),
                     "dtype": str(self.model.dtype)}
        self.last = None   # (collector stats, processor metrics) of the latest generate()
        from ..plugins import hooks

        self.family = hooks(card)   # its memory estimate sizes the batches

    # -- one batch ---------------------------------------------------------------------------------

    def run_batch(self, requests: list) -> list[Result]:
        """One batch, one Result per request in order; an answer ends at any of `self.eos`."""
        import torch

        kwargs = dict(text=[r.prompt for r in requests], padding=True, return_tensors="pt")
        if any(r.images for r in requests):
            kwargs["images"] = [r.images for r in requests]
        kwargs.update(requests[0].mm_kwargs)
        try:
            inputs = self.processor(**kwargs).to(self.device, dtype=self.model.dtype)  # floats only
            longest = int(inputs["attention_mask"].sum(dim=1).max())
            if self.context and longest >= self.context:
                raise PromptTooLong(f"prompt has {longest} tokens; the model's context is {self.context}")
            budget = max(r.max_new_tokens for r in requests)
            if self.context:   # as vLLM does: the answer may use what the context has left
                budget = min(budget, self.context - longest)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=budget, pad_token_id=self.pad_id,
                                          eos_token_id=sorted(self.eos), **sampling(self.card.generation, "hf"))
        except Exception:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [self.finish(request, ids, int(mask.sum())) for request, ids, mask in
                zip(requests, new, inputs["attention_mask"])]

    def finish(self, request, ids: list, prompt_tokens: int) -> Result:
        """One row of generated ids as its request's Result: cut at the request's budget and after the
        first end token, decoded. Families with their own batch code (`generation.generate(hf_batch=)`)
        end with this too."""
        ids = ids[:request.max_new_tokens]
        end = next((i for i, t in enumerate(ids) if t in self.eos), None)
        kept = ids if end is None else ids[:end + 1]
        return Result(index=request.index, dataset=request.dataset,
                      text=self.tokenizer.decode(kept, skip_special_tokens=True),
                      prompt_tokens=prompt_tokens, output_tokens=len(kept))

    # -- a stream ----------------------------------------------------------------------------------

    def _sized(self, request):
        if not request.memory:
            kv = self.family.estimate_memory(request)
            request.memory = batch_bytes(self.card, request, kv)
        return request

    def collector(self) -> BatchCollector:
        return BatchCollector(self.max_batch, self.timeout_s, budget=self.budget, cost=lambda r: r.memory,
                              key=lambda r: (r.dataset, len(r.images), length_bucket(r.prompt_tokens)))

    def generate(self, requests, stop_tokens: tuple = (), batch=None):
        """Results as batches finish. `stop_tokens` end answers besides the checkpoint's end tokens;
        `batch(requests)` replaces `run_batch` for checkpoints with their own generation code."""
        self.eos = self._checkpoint_eos | token_ids(self.tokenizer, stop_tokens)
        collector = self.collector()
        requests = (self._sized(r) for r in requests)   # runs in the producer thread
        processor = BatchProcessor(batch or self.run_batch, max_batch=self.max_batch)
        self.last = (collector.stats, processor.metrics)
        for batch in collect(requests, collector):
            yield from processor.process(batch)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
