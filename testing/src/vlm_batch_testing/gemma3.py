"""A tiny Gemma 3 (SigLIP tower, sliding and global layers), random weights, for tests."""

from __future__ import annotations

from .tiny import ensure_checkpoint, randomize, save_model, train_tokenizer

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

def build_tiny(path) -> None:
    """A ~0.3M-parameter Gemma 3 (SigLIP tower, sliding + global layers), random weights of std 0.2."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

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
    randomize(model)
    save_model(model, path, eos=[ids["<eos>"], ids["<end_of_turn>"]], pad=ids["<pad>"])
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
    return ensure_checkpoint("tiny-gemma3", build_tiny)
