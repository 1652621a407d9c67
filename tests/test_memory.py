"""Each family's memory estimate against the KV cache its tiny checkpoint really allocates.

A case is one message: the family's own prepare makes the Request, the checkpoint's processor the
inputs the transformers engine would give the model, and one forward pass with use_cache=True the
cache; every tensor the returned cache's layers hold (keys, values; a linear-attention layer's conv
and recurrent states) is summed and compared with the estimate for that Request, max_new_tokens=0.

Text tokens: the tiny checkpoints' tokenizers are trained here with 512-token vocabularies, so one
English word often becomes two or three tokens, while the core's word count is meant for real BPE
vocabularies. The checks therefore count the prompt's text with the checkpoint's own tokenizer
(each image placeholder one token), and leave to the estimate what is the family's: the tokens it
counts for each image, and what each of its layers keeps. The word count's estimate is printed too.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from family_helpers import prepare_request
from vlm_batch import defaults, memory
from vlm_batch.plugins import get_model, hooks
from vlm_batch.request import Request

TOLERANCE = 0.15
WORDS = "the red circle is above a blue square and the green triangle is left of it".split()
# (name, words of text, image sizes): long prompts outgrow Gemma's 64-token window and Llama 4's
# 256-token chunk in the tiny configs; the images are small, large (resized, sliced, tiled), tall.
CASES = [("short", 8, []), ("long", 600, []), ("small image", 8, [(64, 64)]),
         ("large image", 20, [(500, 300)]), ("tall image", 20, [(80, 400)]),
         ("long, 2 images", 300, [(200, 120), (90, 90)])]
TABLE: list[tuple] = []


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache's layers hold, in attributes or in dicts of them."""
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            for t in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


class Family:
    """One tiny checkpoint loaded once: its card, processor and model."""

    def __init__(self, name: str, dtype=torch.float32, checkpoint: str | None = None):
        import transformers

        self.card = get_model(name)
        if checkpoint:
            self.card = dataclasses.replace(self.card, checkpoint=checkpoint)
        path = self.card.path()
        self.processor = transformers.AutoProcessor.from_pretrained(path)
        self.model = getattr(transformers, self.card.hf_class).from_pretrained(path, dtype=dtype).eval()

    def request(self, words: int, sizes, image_dir):
        """The family's Request for `words` words after images of `sizes`, read from files as the runner does."""
        message = []
        for i, size in enumerate(sizes):
            file = image_dir / f"{size[0]}x{size[1]}-{i}.png"
            Image.new("RGB", size, (40 * i, 120, 200)).save(file)
            message.append({"type": "image", "value": str(file)})
        message.append({"type": "text", "value": " ".join(WORDS[i % len(WORDS)] for i in range(words))})
        return dataclasses.replace(prepare_request(self.card, message, "MEMORY"), max_new_tokens=0)

    def real_bytes(self, request) -> tuple[int, int]:
        """(bytes of the cache after the prompt's forward pass, the prompt's tokens), as the engine runs it."""
        kwargs = dict(text=[request.prompt], padding=True, return_tensors="pt", **request.mm_kwargs)
        if request.images:
            kwargs["images"] = [request.images]
        inputs = self.processor(**kwargs).to("cpu", dtype=self.model.dtype)
        with torch.inference_mode():
            out = self.model(**inputs, use_cache=True)
        return cache_bytes(out.past_key_values), inputs["input_ids"].shape[1]

    def text_tokens(self, prompt: str) -> int:
        return len(self.processor.tokenizer(prompt)["input_ids"])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("memory-images")


_LOADED: dict = {}


def loaded(name: str) -> Family:
    """One Family per checkpoint for the whole module."""
    if name not in _LOADED:
        _LOADED[name] = Family(name)
    return _LOADED[name]


@pytest.fixture(scope="module", params=["tiny-qwen2-vl", "tiny-gemma3", "tiny-llama4", "tiny-minicpm-v", "tiny-qwen2.5-vl",
                                        "tiny-qwen3-vl", "tiny-qwen3-vl-moe", "tiny-qwen3.5", "tiny-qwen3.5-moe"])
def family(request):
    return loaded(request.param)


@pytest.fixture(scope="module", autouse=True)
def print_table():
    """The numbers of every check, printed when the module ends (shown with -s; failures name theirs)."""
    yield
    print("\nfamily           case                       tokens    real bytes    estimate   ratio  (word count: ratio)")
    for row in TABLE:
        print("{:16} {:26} {:>6} {:>13,} {:>11,} {:>7.3f}  ({:.3f})".format(*row))


def check(name, case, family, request, estimate, monkeypatch, within=True):
    """The estimate's ratio to the real cache, recorded in the table; within (or beyond) 15%."""
    real, tokens = family.real_bytes(request)
    words = estimate(family.card, request)
    monkeypatch.setattr(memory, "approx_text_tokens", family.text_tokens)
    est = estimate(family.card, request)
    monkeypatch.undo()
    ratio = est / real
    TABLE.append((name, case, tokens, real, est, ratio, words / real))
    numbers = f"{name}, {case}: {tokens} tokens, real {real:,} B, estimate {est:,} B, ratio {ratio:.3f}"
    if within:
        assert abs(ratio - 1) <= TOLERANCE, numbers
    else:
        assert abs(ratio - 1) > TOLERANCE, "the default is as good as the family's facts here: " + numbers
    return ratio


def family_estimate(card, request):
    return hooks(card).estimate_memory(request)


@pytest.mark.parametrize("case, words, sizes", CASES, ids=[c[0] for c in CASES])
def test_family_estimate_matches_the_real_cache(family, case, words, sizes, image_dir, monkeypatch):
    request = family.request(words, sizes, image_dir)
    check(family.card.name, case, family, request, family_estimate, monkeypatch)


@pytest.mark.parametrize("case, words, sizes", CASES, ids=[c[0] for c in CASES])
def test_core_default_matches_qwen2_vl(case, words, sizes, image_dir, monkeypatch):
    """The default (every layer full attention, ViT patches after merging) on the one tiny family it
    describes: Qwen2-VL, whose images prepare has already resized to whole 28-px cells."""
    qwen = loaded("tiny-qwen2-vl")
    check("default/qwen2-vl", case, qwen, qwen.request(words, sizes, image_dir),
          defaults.vlm_batch_estimate_memory, monkeypatch)


@pytest.mark.parametrize("name, case, words, sizes", [
    ("tiny-gemma3", "long", 600, []),           # 5 of 6 layers (1 of 2 here) keep only a window
    ("tiny-llama4", "long", 600, []),           # chunked layers keep only a chunk
    ("tiny-minicpm-v", "short", 8, []),         # the linear-attention layer's state is most of it
    ("tiny-minicpm-v", "large image", 20, [(500, 300)]),   # its slices
    ("tiny-qwen3.5", "short", 8, []),           # Gated DeltaNet layers keep a state, not KV
])
def test_default_misses_without_the_familys_facts(name, case, words, sizes, image_dir, monkeypatch):
    fam = loaded(name)
    request = fam.request(words, sizes, image_dir)
    check(name + " (default)", case, fam, request, defaults.vlm_batch_estimate_memory, monkeypatch, within=False)
    check(name, case, fam, request, family_estimate, monkeypatch)


def test_minicpm_v_in_bfloat16(tmp_path, image_dir, monkeypatch):
    """As MiniCPM-V-4_6 runs: bfloat16 keys, values and conv state, but a float32 recurrent state (a
    copy of the tiny checkpoint whose config says bfloat16, loaded so)."""
    import shutil
    from pathlib import Path

    copy = tmp_path / "tiny-minicpm-v-bf16"
    shutil.copytree(Path(get_model("tiny-minicpm-v").path()), copy)
    config = json.loads((copy / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (copy / "config.json").write_text(json.dumps(config))
    fam = Family("tiny-minicpm-v", dtype=torch.bfloat16, checkpoint=str(copy))
    for case, words, sizes in (CASES[0], CASES[3]):
        check("tiny-minicpm-v bf16", case, fam, fam.request(words, sizes, image_dir), family_estimate, monkeypatch)


def test_molmo_text_layers_on_a_stand_in(tmp_path, monkeypatch):
    """What Molmo's estimate reads from a hub checkpoint's config.json (the keys of AI2's MolmoConfig,
    read without its remote code): every layer full attention with its KV heads, against a transformers
    Qwen2 (Molmo-7B-D's language model) of those sizes. The tiny Molmo's whole estimate, image tokens
    included, is checked against the KV cache vLLM allocates in test_family_molmo.py (its images cost
    seconds each here, so it shares that module's engine)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=512)
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["MolmoForCausalLM"], model_type="molmo", torch_dtype="float32",
        auto_map={"AutoConfig": "config_molmo.MolmoConfig", "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
        embedding_size=100, qkv_bias=True, **sizes)))
    card = dataclasses.replace(get_model("molmo-7B-D-0924"), checkpoint=str(tmp_path))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**sizes)).eval()
    for n in (10, 300):
        with torch.inference_mode():
            real = cache_bytes(model(input_ids=torch.randint(0, 100, (1, n)), use_cache=True).past_key_values)
        request = Request(prompt=" ".join(["word"] * n), max_new_tokens=0)
        est = hooks(card).estimate_memory(request)
        TABLE.append(("molmo (stand-in)", f"{n} text tokens", n, real, est, est / real, est / real))
        assert abs(est / real - 1) <= TOLERANCE, f"molmo stand-in, {n} tokens: real {real:,} B, estimate {est:,} B"


def test_omnilmm_counts_its_fixed_image_tokens(tmp_path):
    """OmniLMM cannot run here (its model code is OpenBMB's, not installed), so this only checks what
    its estimate reads from an OmniLMM-style config.json: `num_query` tokens per image (+ its three
    frame tokens) whatever the image's size, where the default would count ViT patches of it."""
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["OmniLMMForCausalLM"], model_type="omnilmm", torch_dtype="bfloat16", num_query=64,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)))
    card = dataclasses.replace(get_model("OmniLMM_12B"), checkpoint=str(tmp_path))
    per_token = 2 * 4 * 16 * 2 * 2     # layers x KV heads x head dim x (K, V) x bfloat16

    def estimate(*sizes, hook=family_estimate):
        request = Request(prompt="What is shown here?", images=[Image.new("RGB", s) for s in sizes], max_new_tokens=0)
        return hook(card, request)

    assert estimate((50, 40)) == estimate((2000, 1500)) == estimate() + (64 + 3) * per_token
    assert estimate((2000, 1500), hook=defaults.vlm_batch_estimate_memory) > 10 * estimate((2000, 1500))
