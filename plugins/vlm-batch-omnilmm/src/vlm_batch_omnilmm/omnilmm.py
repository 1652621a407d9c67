"""OmniLMM for vlm-batch.

`OmniLMM_12B`: vLLM has no OmniLMM architecture and transformers has no OmniLMM class; VLMEvalKit's
`OmniLMM12B.generate_vllm` is plain transformers generation with OpenBMB's `omnilmm` code (from the
OmniLMM repository, put on the path, as VLMEvalKit's `OmniLMM_ROOT`). So it runs on the transformers
engine only, batched, when that code imports; otherwise starting it says what to install. Its prompt is
VLMEvalKit's: the message's texts joined by newlines, the first image, OmniLMM's chat format (the
checkpoint tokenizer's template with OmniLMM's system turn, the image as <im_start><im_patch>*N<im_end>).
"""

from __future__ import annotations

import importlib.util

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.engines import EngineError
from vlm_batch.generation import generate

FAMILY = "omnilmm"
OMNI_SYSTEM = ("You are an artificial intelligence assistant, which gives helpful, detailed, and polite "
               "answers to the human's questions.")   # what omnilmm's `omni_preprocess` inserts
OMNI_MAX_NEW_TOKENS = 512                              # VLMEvalKit's OmniLMM12B default
OMNI_REPETITION_PENALTY = 1.1                          # VLMEvalKit's too


class OmniLMMNotInstalled(EngineError):
    pass


def _omnilmm_checkpoint() -> str:
    """The hub id, once OpenBMB's `omnilmm` code is importable and its classes are known to transformers."""
    if importlib.util.find_spec("omnilmm") is None:
        raise OmniLMMNotInstalled(
            "OmniLMM_12B needs OpenBMB's `omnilmm` code, which is not installed: clone "
            "https://github.com/OpenBMB/OmniLMM and put it on PYTHONPATH (VLMEvalKit's OmniLMM_ROOT), with "
            "the packages its requirements.txt names; or use MiniCPM-V-4_6, its successor, which needs nothing")
    from omnilmm.model.omnilmm import OmniLMMConfig, OmniLMMForCausalLM
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("omnilmm", OmniLMMConfig)
        AutoModelForCausalLM.register(OmniLMMConfig, OmniLMMForCausalLM)
    except ValueError:   # already registered in this process
        pass
    return "openbmb/OmniLMM-12B"


@hookimpl
def vlm_batch_models():
    return [ModelCard(name="OmniLMM_12B", family=FAMILY, checkpoint=_omnilmm_checkpoint, engines=("hf",),
                      hf_class="AutoModelForCausalLM", max_new_tokens=OMNI_MAX_NEW_TOKENS,
                      description="transformers only, with OpenBMB's omnilmm code (vLLM has no OmniLMM)")]


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    """VLMEvalKit: the texts joined, the first image; the chat is built at generation."""
    text = "\n".join(p["value"] for p in message if p["type"] == "text")
    images = [p["image"] for p in message if p["type"] == "image"][:1]
    return Request(prompt=text, images=images, max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_generate(card, engine, requests):
    # the core batches; omnilmm's own code embeds the images
    return generate(engine, requests, hf_batch=_omnilmm_batch, clean=lambda request, text: text.strip())


def _omnilmm_batch(engine, requests):
    """One left-padded batch the way VLMEvalKit's OmniLMM12B builds one item (omnilmm's image transform,
    OmniLMM's chat with the image tokens, `get_vllm_embedding`), then one `generate` on the embeddings."""
    import torch
    from omnilmm.model.utils import build_transform

    model, tokenizer = engine.model, engine.tokenizer
    state = getattr(engine, "_omnilmm", None)
    if state is None:   # as VLMEvalKit's init_omni_lmm: the image tokens join the vocabulary once
        tokenizer.add_tokens(["<im_patch>", "<im_start>", "<im_end>"], special_tokens=True)
        vision = model.model.vision_config
        vision.im_patch_token, vision.im_start_token, vision.im_end_token = tokenizer.convert_tokens_to_ids(
            ["<im_patch>", "<im_start>", "<im_end>"])
        vision.use_im_start_end = True
        state = engine._omnilmm = {
            "transform": build_transform(is_train=False, input_size=model.model.config.image_size,
                                         std_mode="OPENAI_CLIP"),
            "image": "<im_start>" + "<im_patch>" * model.model.config.num_query + "<im_end>"}
    texts = [tokenizer.apply_chat_template(
        [{"role": "system", "content": OMNI_SYSTEM},
         {"role": "user", "content": (state["image"] + "\n" if r.images else "") + r.prompt}],
        tokenize=False, add_generation_prompt=True) for r in requests]
    inputs = tokenizer(texts, return_tensors="pt", padding=True).to(engine.device)
    pixels = [state["transform"](r.images[0]).to(engine.device, model.dtype) if r.images else [] for r in requests]
    budget = max(r.max_new_tokens for r in requests)
    with torch.inference_mode():
        embeds, _ = model.model.get_vllm_embedding({"input_ids": inputs["input_ids"], "pixel_values": pixels})
        out = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=budget,
                             do_sample=False, repetition_penalty=OMNI_REPETITION_PENALTY, pad_token_id=engine.pad_id)
    return [engine.finish(request, row, int(mask.sum()))
            for request, row, mask in zip(requests, out.tolist(), inputs["attention_mask"])]


@hookimpl
def vlm_batch_estimate_memory(card, request):
    from vlm_batch.memory import estimate_kv

    return estimate_kv(card, request, image_tokens)   # every layer full attention


def image_tokens(card, width, height) -> int:
    """OmniLMM resamples every image into the config's `num_query` tokens whatever its size, framed by
    <im_start> and <im_end> and followed by a newline (as `_omnilmm_batch` writes them)."""
    from vlm_batch.memory import model_config

    return int(model_config(card).get("num_query") or 64) + 3
