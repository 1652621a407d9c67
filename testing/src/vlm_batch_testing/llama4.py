"""A tiny Llama 4 (MoE text layers, chunked attention, tiled vision), random weights, for tests."""

from __future__ import annotations

from .tiny import ensure_checkpoint, randomize, save_model, train_tokenizer

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", "<|header_start|>",
                  "<|header_end|>", "<|eom|>", "<|eot|>", "<|image_start|>", "<|image_end|>", "<|image|>",
                  "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>", "<|python_start|>",
                  "<|python_end|>"]
TINY_IMAGES = {"tile": 56, "patch": 14, "shuffle": 0.5, "max_tiles": 4}


def build_tiny(path) -> None:
    """A ~0.4M-parameter Llama 4 (MoE text layers, chunked attention, tiled vision), random weights of std 0.2."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessorFast, Llama4Processor

    tok = train_tokenizer(SPECIAL_TOKENS, bos_token="<|begin_of_text|>", eos_token="<|eot|>",
                          pad_token="<|finetune_right_pad|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    tok._tokenizer.post_processor = TemplateProcessing(   # as Llama's tokenizer: BOS on every text
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])
    stops = [ids["<|end_of_text|>"], ids["<|eom|>"], ids["<|eot|>"]]
    t = TINY_IMAGES
    torch.manual_seed(0)
    config = Llama4Config(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=2,
                         attention_chunk_size=256, no_rope_layer_interval=2, max_position_embeddings=2048,
                         initializer_range=0.2, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=stops,
                         pad_token_id=ids["<|finetune_right_pad|>"]),
        # The pixel-shuffle adapter takes hidden_size / shuffle**2 features: that must be intermediate_size.
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=t["tile"], patch_size=t["patch"], pixel_shuffle_ratio=t["shuffle"],
                           vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                           initializer_range=0.2),
        boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"],
    )
    model = Llama4ForConditionalGeneration(config)   # float32 already; .to() would drop its complex rope buffer
    randomize(model)
    save_model(model, path, eos=stops, pad=ids["<|finetune_right_pad|>"])
    image_processor = Llama4ImageProcessorFast(size={"height": t["tile"], "width": t["tile"]},
                                               max_patches=t["max_tiles"])
    processor = Llama4Processor(image_processor=image_processor, tokenizer=tok, patch_size=t["patch"],
                                pixel_shuffle_ratio=t["shuffle"])   # with transformers' Llama 4 chat template
    processor.save_pretrained(path)


def tiny_checkpoint() -> str:
    return ensure_checkpoint("tiny-llama4", build_tiny)
