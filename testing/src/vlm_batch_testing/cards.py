"""The tiny models of every family, as cards served by that family's plugin (installed with the tests
only: `vlm-batch models` lists them where the tests run, never where users do)."""

import dataclasses
import functools
import importlib

from vlm_batch import ModelCard, hookimpl


def built(module: str) -> str:
    """The tiny checkpoint `vlm_batch_testing.<module>` builds, once, under the cache (`module:function`
    names another builder of that module)."""
    module, _, function = module.partition(":")
    return getattr(importlib.import_module(f"vlm_batch_testing.{module}"), function or "tiny_checkpoint")()


def _card(name: str, family: str, plugin: str, module: str, **kw) -> ModelCard:
    return ModelCard(name=name, family=family, plugin=plugin, checkpoint=functools.partial(built, module),
                     description=f"random-weight {kw.pop('arch')} built locally, for tests", **kw)


def _entry_card(name: str, plugin: str, module: str, vlmeval_name: str, arch: str, **changes) -> ModelCard:
    """The card the family plugin makes of a VLMEvalKit registry entry (the same class, arguments,
    prompts and engine facts), on a tiny checkpoint, greedy, with short answers and a short context."""
    from vlm_batch.served import card_for
    from vlm_batch.plugins import load_plugins, pm
    from vlm_batch.vlmeval.registry import entry

    load_plugins()
    real = card_for(entry(vlmeval_name), pm.get_plugin(plugin))
    small = {**real.vllm_args, "max_model_len": 2048, "limit_mm_per_prompt": {"image": 4}}
    small.pop("enable_expert_parallel", None)
    return dataclasses.replace(real, name=name, vlmeval_name=vlmeval_name, checkpoint=functools.partial(built, module),
                               max_new_tokens=12, generation={}, vllm_args=small, plugin=plugin,
                               description=f"random-weight {arch} built locally, for tests", **changes)


def qwen_cards() -> list[ModelCard]:
    """Qwen2.5-VL (served by the Qwen2-VL plugin) and every Qwen3-VL architecture, each as the card of a
    VLMEvalKit entry of its kind, with the tiny checkpoints' image bounds."""
    from vlm_batch_testing import qwen2_5_vl, qwen3_vl

    q3 = qwen3_vl.TINY_PIXELS
    cards = [("tiny-qwen2.5-vl", "qwen2_vl", "qwen2_5_vl", "Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL", qwen2_5_vl.TINY_PIXELS),
             ("tiny-qwen3-vl", "qwen3_vl", "qwen3_vl", "Qwen3-VL-8B-Instruct", "Qwen3-VL", q3),
             ("tiny-qwen3-vl-thinking", "qwen3_vl", "qwen3_vl:tiny_thinking_checkpoint", "Qwen3-VL-8B-Thinking",
              "Qwen3-VL Thinking", q3),
             ("tiny-qwen3-vl-moe", "qwen3_vl", "qwen3_vl_moe", "Qwen3-VL-30B-A3B-Instruct", "Qwen3-VL MoE", q3),
             ("tiny-qwen3.5", "qwen3_vl", "qwen3_5", "Qwen3.5-27B", "Qwen3.5", q3),
             ("tiny-qwen3.5-moe", "qwen3_vl", "qwen3_5_moe", "Qwen3.5-35B-A3B", "Qwen3.5 MoE", q3)]
    from vlm_batch.plugins import load_plugins, pm

    load_plugins()
    return [_entry_card(name, plugin, module, entry, arch, options={**_args(entry), **pixels})
            for name, plugin, module, entry, arch, pixels in cards if pm.get_plugin(plugin) is not None]


def _args(name: str) -> dict:
    from vlm_batch.vlmeval.registry import entry

    return entry(name).args


@hookimpl
def vlm_batch_models():
    from vlm_batch_gemma3 import SYSTEM
    from vlm_batch_molmo import HF_CLASS as MOLMO_CLASS

    small = {"max_model_len": 1024}
    return [
        _card("tiny-gemma3", "gemma3", "gemma3", "gemma3", arch="Gemma 3", vlmeval_name="Gemma3-4B", max_new_tokens=12,
              hf_class="Gemma3ForConditionalGeneration", prompt_attrs={"system_prompt": SYSTEM},
              options={"system": SYSTEM, "max_images": 4, "image_tokens": 16},
              vllm_args={**small, "limit_mm_per_prompt": {"image": 4}}),
        _card("tiny-llama4", "llama4", "llama4", "llama4", arch="Llama 4", vlmeval_name="Llama-4-Scout-17B-16E-Instruct",
              max_new_tokens=12, hf_class="Llama4ForConditionalGeneration",
              options={"max_images": 4, "tile": 56, "patch": 14, "shuffle": 0.5, "max_tiles": 4},
              vllm_args={"max_model_len": 2048, "limit_mm_per_prompt": {"image": 4}}),
        _card("tiny-minicpm-v", "minicpm-v", "minicpm_v", "minicpmv", arch="MiniCPM-V 4.6", vlmeval_name="MiniCPM-V-4_6",
              max_new_tokens=12, hf_class="MiniCPMV4_6ForConditionalGeneration", options={"max_images": 4},
              vllm_args={"max_model_len": 2048, "limit_mm_per_prompt": {"image": 4}},
              vllm_cpu_args={"dtype": "bfloat16"}),
        # vLLM's Molmo builds the full-size 300M vision tower whatever the config says: seconds a crop
        # here, so one crop (plus the global view) an image.
        _card("tiny-molmo", "molmo", "molmo", "molmo", arch="Molmo (tiny language model, full-size vision tower)",
              vlmeval_name="molmo-7B-D-0924", max_new_tokens=12, hf_class=MOLMO_CLASS,
              trust_remote_code=True, options={"max_crops": 1},
              vllm_args={"max_model_len": 1024, "limit_mm_per_prompt": {"image": 1}}),
        *qwen_cards(),
    ]
