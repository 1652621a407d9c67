"""OmniLMM and its successor MiniCPM-V for vlm-batch.

`OmniLMM_12B`: vLLM has no OmniLMM architecture and transformers has no OmniLMM class; VLMEvalKit's
`OmniLMM12B.generate_vllm` is plain transformers generation with OpenBMB's `omnilmm` code (from the
OmniLMM repository, put on the path, as VLMEvalKit's `OmniLMM_ROOT`). So it runs on the transformers
engine only, batched, when that code imports; otherwise starting it says what to install. Its prompt is
VLMEvalKit's: the message's texts joined by newlines, the first image, OmniLMM's chat format (the
checkpoint tokenizer's template with OmniLMM's system turn, the image as <im_start><im_patch>*N<im_end>).

`MiniCPM-V-4_6` (openbmb/MiniCPM-V-4.6): the OpenBMB line's current model, native in transformers
(`MiniCPMV4_6ForConditionalGeneration`) and vLLM (`MiniCPMV4_6ForConditionalGeneration`), so no
remote code. VLMEvalKit has no class for it, so the dataset's own prompts apply. The chat text comes
from the checkpoint's own chat template, its image placeholder (`<|image_pad|>`) expanded by the
processor (transformers) or by vLLM's MiniCPM-V 4.6 processor.
"""

from __future__ import annotations

import functools
import importlib.util

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.generation import generate, parts
from vlm_batch.engines import EngineError

FAMILY = "omnilmm"
OMNI_SYSTEM = ("You are an artificial intelligence assistant, which gives helpful, detailed, and polite "
               "answers to the human's questions.")   # what omnilmm's `omni_preprocess` inserts
OMNI_MAX_NEW_TOKENS = 512                              # VLMEvalKit's OmniLMM12B default
OMNI_REPETITION_PENALTY = 1.1                          # VLMEvalKit's too
MINICPM_MAX_NEW_TOKENS = 2048                          # VLMEvalKit's MiniCPM-V 4.x default
MINICPM_MAX_IMAGES = 16
CPU_BF16 = {"dtype": "bfloat16"}    # vLLM-CPU runs MiniCPM-V 4.6's linear-attention (GDN) layers only in bf16
IMAGE_PAD = "<|image_pad|>"
IM_END = "<|im_end|>"


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


# ChatML, as MiniCPM-V 4.6's template renders one user turn; used for the tiny checkpoint.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|image_pad|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<image>",
                  "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>"]
NAMED_TOKENS = dict(image_token="<|image_pad|>", video_token="<|video_pad|>", image_start_token="<image>",
                    image_end_token="</image>", slice_start_token="<slice>", slice_end_token="</slice>",
                    image_id_start_token="<image_id>", image_id_end_token="</image_id>")
TINY_PIXELS = {"scale_resolution": 56, "patch_size": 14, "max_slice_nums": 4}


def build_tiny(path) -> None:
    """A ~0.3M-parameter MiniCPM-V 4.6 (SigLIP-style tower with merger, Qwen3.5 text model with one
    linear-attention and one full-attention layer), random weights of std 0.2."""
    import torch
    from transformers import (MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_6ImageProcessor,
                              MiniCPMV4_6Processor, MiniCPMV4_6VideoProcessor)
    from vlm_batch_testing.tiny import train_tokenizer

    tok = train_tokenizer(SPECIAL_TOKENS, chat_template=TINY_CHAT_TEMPLATE, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", extra_special_tokens=NAMED_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(0)
    config = MiniCPMV4_6Config(
        text_config=dict(model_type="qwen3_5_text", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=1,
                         linear_num_value_heads=1, layer_types=["linear_attention", "full_attention"],
                         max_position_embeddings=2048, initializer_range=0.2,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, insert_layer_id=1),
        insert_layer_id=1, image_size=56, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    model = MiniCPMV4_6ForConditionalGeneration(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor = MiniCPMV4_6Processor(image_processor=MiniCPMV4_6ImageProcessor(**TINY_PIXELS),
                                     video_processor=MiniCPMV4_6VideoProcessor(**TINY_PIXELS), tokenizer=tok,
                                     chat_template=TINY_CHAT_TEMPLATE)
    processor.save_pretrained(path)


def tiny_checkpoint() -> str:
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-minicpm-v", build_tiny)


@hookimpl
def vlm_batch_models():
    return [
        ModelCard(name="OmniLMM_12B", family=FAMILY, checkpoint=_omnilmm_checkpoint, engines=("hf",),
                  hf_class="AutoModelForCausalLM", max_new_tokens=OMNI_MAX_NEW_TOKENS,
                  options={"kind": "omnilmm"},
                  description="transformers only, with OpenBMB's omnilmm code (vLLM has no OmniLMM)"),
        ModelCard(name="MiniCPM-V-4_6", family=FAMILY, checkpoint="openbmb/MiniCPM-V-4.6",
                  hf_class="MiniCPMV4_6ForConditionalGeneration", max_new_tokens=MINICPM_MAX_NEW_TOKENS,
                  options={"kind": "minicpmv", "max_images": MINICPM_MAX_IMAGES},
                  vllm_args={"max_model_len": 32768, "limit_mm_per_prompt": {"image": MINICPM_MAX_IMAGES}},
                  vllm_cpu_args=CPU_BF16,
                  description="OmniLMM's successor; not a VLMEvalKit name (VLMEvalKit has no MiniCPM-V 4.6)"),
        ModelCard(name="tiny-minicpm-v", family=FAMILY, checkpoint=tiny_checkpoint, vlmeval_name="MiniCPM-V-4_6",
                  hf_class="MiniCPMV4_6ForConditionalGeneration", max_new_tokens=12,
                  options={"kind": "minicpmv", "max_images": 4},
                  vllm_args={"max_model_len": 2048, "limit_mm_per_prompt": {"image": 4}},
                  vllm_cpu_args=CPU_BF16,
                  description="random-weight MiniCPM-V 4.6 built locally, for tests", test_only=True),
    ]


@functools.lru_cache(maxsize=4)
def _chat_template(path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    if card.family != FAMILY:
        return None
    if card.options["kind"] == "omnilmm":   # VLMEvalKit: texts joined, first image; the chat is built at generation
        text = "\n".join(p["value"] for p in message if p["type"] == "text")
        images = [p["image"] for p in message if p["type"] == "image"][:1]
        return Request(prompt=text, images=images, max_new_tokens=card.max_new_tokens)
    content, images = parts(message, card.options["max_images"])
    content = [{"type": "image"} if kind == "image" else {"type": "text", "text": text} for kind, text in content]
    prompt = _chat_template(card.path()).apply_chat_template([{"role": "user", "content": content}],
                                                             tokenize=False, add_generation_prompt=True)
    return Request(prompt=prompt, images=images, max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_generate(card, engine, requests):
    if card.family != FAMILY:
        return None
    if card.options["kind"] == "omnilmm":   # the core batches; omnilmm's own code embeds the images
        return generate(engine, requests, hf_batch=_omnilmm_batch)
    return generate(engine, requests, stop_tokens=(IM_END,))   # MiniCPM-V: ChatML's end of turn


def _omnilmm_batch(engine, requests):
    """One left-padded batch the way VLMEvalKit's OmniLMM12B builds one item (omnilmm's image transform,
    OmniLMM's chat with the image tokens, `get_vllm_embedding`), then one `generate` on the embeddings."""
    import torch
    from omnilmm.model.utils import build_transform
    from vlm_batch.request import Result

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
    results = []
    for request, row, mask in zip(requests, out.tolist(), inputs["attention_mask"]):
        row = row[:request.max_new_tokens]
        end = next((i for i, t in enumerate(row) if t in engine.eos), None)
        kept = row if end is None else row[:end + 1]
        results.append(Result(index=request.index, dataset=request.dataset,
                              text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                              prompt_tokens=int(mask.sum()), output_tokens=len(kept)))
    return results


def linear_state_bytes(cfg: dict) -> int:
    """What one linear-attention (gated delta net) layer keeps, whatever the length: its causal-conv
    window over the q, k and v projections (model dtype) and its recurrent state per value head (float32
    whatever the model's dtype: transformers' gated delta rule computes it in float32 and keeps it so)."""
    from vlm_batch.memory import dtype_bytes, text_config

    t = text_config(cfg)
    keys, values = t["linear_num_key_heads"] * t["linear_key_head_dim"], t["linear_num_value_heads"] * t["linear_value_head_dim"]
    conv = (2 * keys + values) * t.get("linear_conv_kernel_dim", 4)
    recurrent = t["linear_num_value_heads"] * t["linear_key_head_dim"] * t["linear_value_head_dim"]
    return conv * dtype_bytes(cfg) + recurrent * 4


@hookimpl
def vlm_batch_estimate_memory(card, request):
    if card.family != FAMILY:
        return None
    from vlm_batch.memory import estimate_kv, layer_spans, model_config

    if card.options["kind"] == "omnilmm":   # every layer full attention
        return estimate_kv(card, request, omnilmm_image_tokens)
    cfg = model_config(card)   # Qwen3.5 layers: linear attention (a fixed state) and full attention
    return estimate_kv(card, request, image_tokens, layer_spans(cfg), linear_state_bytes(cfg))


def omnilmm_image_tokens(card, width, height) -> int:
    """OmniLMM resamples every image into the config's `num_query` tokens whatever its size, framed by
    <im_start> and <im_end> and followed by a newline (as `_omnilmm_batch` writes them)."""
    from vlm_batch.memory import model_config

    return int(model_config(card).get("num_query") or 64) + 3


def image_tokens(card, width, height) -> int:
    """MiniCPM-V's slices, sized by the checkpoint's own image processor (448-px slices, at most 9, in
    MiniCPM-V 4.6): an overview of the whole image between <image> and </image>, and when the image is
    larger than one slice a grid of slices, each between <slice> and </slice>, rows split by a newline;
    a token per 16 patches (4 in "4x" mode), an <image_id>N</image_id> tag in front."""
    ip = _chat_template(card.path()).image_processor
    patch, size = ip.patch_size, ip.scale_resolution

    def tokens(h, w):
        return (h // patch) * (w // patch) // (4 if ip.downsample_mode == "4x" else 16) + 2

    grid = ip.get_sliced_grid((height, width), ip.max_slice_nums, size) if ip.slice_mode else None
    count = tokens(*ip.find_best_resize((height, width), size, patch, allow_upscale=grid is None))
    if grid:
        rows, cols = grid
        h, w = ip.get_refine_size((height, width), grid, size, patch, allow_upscale=True)
        count += rows * cols * tokens(h // rows, w // cols) + rows - 1
    return count + (3 if ip.use_image_id else 0)
