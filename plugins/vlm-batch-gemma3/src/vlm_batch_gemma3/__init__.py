"""Gemma 3 for vlm-batch: names, prompt format, image limit, engine arguments, and a tiny checkpoint.

The system prompt. VLMEvalKit's `Gemma3` puts "You are a helpful assistant. " in front of every
question on its transformers path (its default: `Gemma3-4B` & co. are built without `use_vllm`) and
drops it on its vLLM path. We keep it on both engines: the default path is the one VLMEvalKit's
published Gemma3 scores come from, and one model name must mean one prompt whichever engine runs it.

The BOS token. Gemma's tokenizer adds `<bos>` itself, so the prompt text starts after it: the
engines tokenize with special tokens on, and a `<bos>` in the text as well would give the model two
(VLMEvalKit's vLLM path does that; its transformers path does not).
"""

from __future__ import annotations

from vlm_batch import ModelCard, Request, hookimpl
from vlm_batch.generation import generate, parts

FAMILY = "gemma3"
SYSTEM = "You are a helpful assistant. "   # VLMEvalKit's Gemma3 default system prompt
MAX_IMAGES = 24                            # VLMEvalKit's limit_mm_per_prompt for Gemma3
MAX_NEW_TOKENS = 4096                      # VLMEvalKit's Gemma3 default
IMAGE = "<start_of_image>"                 # the processor expands it into the image's soft tokens
IMAGE_TOKENS = 256                         # mm_tokens_per_image of every Gemma 3 checkpoint

# What Gemma 3 instruction checkpoints' chat template renders: the system turn is folded into the
# first user turn, text parts are trimmed, images become <start_of_image>, roles are user/model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(prefix='') %}{% set turns = messages %}"
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set ns.prefix = (sys if sys is string else sys[0]['text']) + '\n\n' %}{% set turns = messages[1:] %}{% endif %}"
    "{% for message in turns %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if loop.first %}{{ ns.prefix }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Gemma's vocabulary has runs of newlines as single tokens, and vLLM's Gemma 3 processor looks them up.
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
TINY_IMAGE_TOKENS = 16   # 4 x 4 pooled tokens from an 8 x 8 patch grid
END_OF_TURN = ("<end_of_turn>",)   # ends the model's turn: pre-trained checkpoints list only <eos>


def render(system: str | None, content: list[tuple[str, str]]) -> str:
    """The chat text after `<bos>`: one user turn of (kind, text) parts, then the model's turn."""
    head = f"{system}\n\n" if system else ""
    body = "".join(IMAGE if kind == "image" else text.strip() for kind, text in content)
    return f"<start_of_turn>user\n{head}{body}<end_of_turn>\n<start_of_turn>model\n"


def build_tiny(path) -> None:
    """A ~0.3M-parameter Gemma 3 (SigLIP tower, sliding + global layers), random weights of std 0.2."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor
    from vlm_batch_testing.tiny import train_tokenizer

    tok = train_tokenizer(SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE, bos_token="<bos>", eos_token="<eos>",
                          pad_token="<pad>", unk_token="<unk>",
                          extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                "image_token": "<image_soft_token>"})
    tok.add_tokens(NEWLINES)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # As Gemma's own tokenizer does: <bos> is added to every encoded text.
    tok._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", ids["<bos>"])])
    torch.manual_seed(0)
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                         sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=2048, initializer_range=0.2,
                         bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
                         pad_token_id=ids["<pad>"], tie_word_embeddings=False),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8, vision_use_head=False),
        mm_tokens_per_image=TINY_IMAGE_TOKENS, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"], initializer_range=0.2,
        # Untied: with Gemma's sqrt(hidden)-scaled embeddings, a tied random head just repeats the last token.
        tie_word_embeddings=False,
    )
    model = Gemma3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():   # std 0.2 everywhere, so answers vary with the image and the question
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(path)
    _hub_layout(path)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 64, "width": 64}),
                                tokenizer=tok, chat_template=CHAT_TEMPLATE, image_seq_length=TINY_IMAGE_TOKENS)
    processor.save_pretrained(path)


def _hub_layout(path) -> None:
    """Vision weights under `vision_tower.vision_model.`, as in Gemma 3 checkpoints on the hub.

    transformers 5 saves them one level up, where vLLM's weight loader does not look; transformers
    itself loads either layout.
    """
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    file = Path(path) / "model.safetensors"
    weights = load_file(file)
    moved = {("vision_tower.vision_model." + k[len("vision_tower."):]
              if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
             for k, v in weights.items()}
    save_file(moved, file, metadata={"format": "pt"})


def tiny_checkpoint() -> str:
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint("tiny-gemma3", build_tiny)


def _card(name, checkpoint, **kw):
    return ModelCard(name=name, family=FAMILY, checkpoint=checkpoint,
                     prompt_attrs={"system_prompt": SYSTEM}, **kw)


@hookimpl
def vlm_batch_models():
    real = dict(max_new_tokens=MAX_NEW_TOKENS, hf_class="Gemma3ForConditionalGeneration",
                options={"system": SYSTEM, "max_images": MAX_IMAGES, "image_tokens": IMAGE_TOKENS},
                vllm_args={"max_model_len": 16384, "limit_mm_per_prompt": {"image": MAX_IMAGES}})
    return [
        _card("Gemma3-4B", "google/gemma-3-4b-it", **real),
        _card("Gemma3-12B", "google/gemma-3-12b-it", **real),
        _card("Gemma3-27B", "google/gemma-3-27b-it", **real),
        _card("tiny-gemma3", tiny_checkpoint, vlmeval_name="Gemma3-4B", max_new_tokens=12,
              hf_class="Gemma3ForConditionalGeneration",
              options={"system": SYSTEM, "max_images": 4, "image_tokens": TINY_IMAGE_TOKENS},
              vllm_args={"max_model_len": 1024, "limit_mm_per_prompt": {"image": 4}},
              description="random-weight Gemma 3 built locally, for tests", test_only=True),
    ]


@hookimpl
def vlm_batch_prepare(card, message, dataset):
    if card.family != FAMILY:
        return None
    content, images = parts(message, card.options["max_images"])
    return Request(prompt=render(card.options.get("system"), content), images=images,
                   max_new_tokens=card.max_new_tokens)


@hookimpl
def vlm_batch_generate(card, engine, requests):
    if card.family != FAMILY:
        return None
    return generate(engine, requests, stop_tokens=END_OF_TURN)


def image_tokens(card, width, height) -> int:
    # Every image is resized to one square: a fixed count, plus "\n\n<boi>" and "<eoi>\n\n".
    return card.options["image_tokens"] + 4


def spans(cfg: dict) -> list:
    """5 of every 6 layers keep a sliding window (1024 tokens in Gemma 3) and the 6th keeps all; configs
    saved before `layer_types` existed say so with `sliding_window_pattern`."""
    from vlm_batch.memory import FULL, layer_spans, text_config

    t = text_config(cfg)
    if t.get("layer_types"):
        return layer_spans(cfg)
    every = int(t.get("sliding_window_pattern") or 6)
    window = int(t.get("sliding_window") or 1024)
    return [FULL if (i + 1) % every == 0 else window for i in range(int(t["num_hidden_layers"]))]


@hookimpl
def vlm_batch_estimate_memory(card, request):
    if card.family != FAMILY:
        return None
    from vlm_batch.memory import estimate_kv, model_config

    return estimate_kv(card, request, image_tokens, spans(model_config(card)))
