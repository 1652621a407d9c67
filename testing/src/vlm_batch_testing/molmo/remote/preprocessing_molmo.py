"""Molmo's processor: the text in Molmo's message format, tokenized; the images' crops and tokens
(from the image processor) put in place; the BOS token (Qwen2's `<|endoftext|>`) in front.

Entry points, as Molmo's remote processor has them (and as vLLM and VLMEvalKit call them):
- `get_tokens_input(prompt, message_format, always_start_with_space)`: token ids of the text;
- `process(text=None, images=None, *, tokens=None, images_kwargs=None, text_kwargs=None, **flat)`:
  one unbatched item, {"input_ids" (L,), "images" (crops, 576, 588), "image_masks" (crops, 576),
  "image_input_idx" (crops, 144)} as torch tensors. Flat keyword arguments (as vLLM passes
  `mm_processor_kwargs`) override the scoped ones, which override the defaults.
"""

from typing import Optional

import numpy as np
import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs

from .image_preprocessing_molmo import OPTIONS as IMAGE_OPTIONS
from .image_preprocessing_molmo import MolmoImagesKwargs

DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
DEFAULT_IM_COL_TOKEN = "<im_col>"
IMAGE_PROMPT = "<|image|>"
EXTRA_TOKENS = (DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN, DEFAULT_IM_COL_TOKEN,
                IMAGE_PROMPT)


class MolmoTextKwargs(TextKwargs, total=False):
    message_format: Optional[str]
    always_start_with_space: Optional[bool]


class MolmoProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: MolmoTextKwargs
    images_kwargs: MolmoImagesKwargs
    _defaults = {"text_kwargs": {"message_format": "role", "always_start_with_space": True}}


TEXT_OPTIONS = ("message_format", "always_start_with_space")


def special_token_ids(tokenizer) -> dict:
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in EXTRA_TOKENS}
    missing = [tok for tok, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer lacks Molmo's image tokens {missing}")
    return ids


class MolmoProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def get_tokens_input(self, prompt: str, message_format: Optional[str] = "role",
                         always_start_with_space: bool = True) -> list:
        """Token ids of `prompt`: in Molmo's "role" format ("User: {prompt} Assistant:") or as it is
        ("none"), after one space if `always_start_with_space`; no special tokens added."""
        if message_format == "role":
            prompt = f"User: {prompt} Assistant:"
        elif message_format not in (None, "none"):
            raise NotImplementedError(f"message format {message_format!r}")
        if always_start_with_space:
            prompt = " " + prompt
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _options(self, images_kwargs, text_kwargs, flat) -> tuple:
        text_opts = dict(MolmoProcessorKwargs._defaults["text_kwargs"])
        text_opts.update({k: v for k, v in (text_kwargs or {}).items() if k in TEXT_OPTIONS})
        text_opts.update({k: v for k, v in flat.items() if k in TEXT_OPTIONS})
        image_opts = {k: v for k, v in (images_kwargs or {}).items() if k in IMAGE_OPTIONS}
        image_opts.update({k: v for k, v in flat.items() if k in IMAGE_OPTIONS})
        return text_opts, image_opts

    def process(self, text=None, images=None, *, tokens=None, images_kwargs=None, text_kwargs=None, **kwargs):
        text_opts, image_opts = self._options(images_kwargs, text_kwargs, kwargs)
        if tokens is None:
            tokens = self.get_tokens_input(text or "", text_opts["message_format"],
                                           text_opts["always_start_with_space"])
        tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images:
            ids = special_token_ids(self.tokenizer)
            out = self.image_processor.multimodal_preprocess(
                images, tokens, ids[DEFAULT_IMAGE_PATCH_TOKEN], ids[DEFAULT_IM_COL_TOKEN],
                ids[DEFAULT_IM_START_TOKEN], ids[DEFAULT_IM_END_TOKEN], ids[IMAGE_PROMPT], **image_opts)
        else:
            out = {"input_ids": np.asarray(tokens, np.int64)}

        # The BOS token in front (Qwen2 has none: its end-of-text token serves), features shift by one.
        bos = self.tokenizer.bos_token_id
        if bos is None:
            bos = self.tokenizer.eos_token_id
        out["input_ids"] = np.concatenate([[bos], out["input_ids"]]).astype(np.int64)
        if "image_input_idx" in out:
            idx = out["image_input_idx"]
            out["image_input_idx"] = np.where(idx >= 0, idx + 1, idx)
        return BatchFeature({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()})
