"""A complete vlm-batch plugin: one model, its checkpoint, its prompt format."""

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch_qwen2_vl import tiny_checkpoint   # any local path or hub id works here

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"   # where this model wants each image


@hookimpl
def vlm_batch_models():
    return [ModelCard(name="hello-vlm", family="hello", checkpoint=tiny_checkpoint,
                      engines=("vllm", "hf"), max_new_tokens=8,
                      vllm_args={"max_model_len": 2048, "limit_mm_per_prompt": {"image": 2}})]


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    images = [part["image"] for part in message if part["type"] == "image"]
    text = "".join(part["value"] for part in message if part["type"] == "text")
    prompt = f"<|im_start|>user\n{IMAGE * len(images)}{text}<|im_end|>\n<|im_start|>assistant\n"
    return Request(prompt=prompt, images=images, max_new_tokens=card.max_new_tokens)
