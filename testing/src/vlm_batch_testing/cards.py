"""The tiny models of every family, as cards served by that family's plugin (installed with the tests
only: `vlm-batch models` lists them where the tests run, never where users do)."""

import functools
import importlib

from vlm_batch import ModelCard, hookimpl


def built(module: str) -> str:
    """The tiny checkpoint `vlm_batch_testing.<module>` builds, once, under the cache."""
    return importlib.import_module(f"vlm_batch_testing.{module}").tiny_checkpoint()


def _card(name: str, family: str, plugin: str, module: str, **kw) -> ModelCard:
    return ModelCard(name=name, family=family, plugin=plugin, checkpoint=functools.partial(built, module),
                     description=f"random-weight {kw.pop('arch')} built locally, for tests", **kw)


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
    ]
