"""A tiny Molmo checkpoint, built locally, that vLLM's native `MolmoForCausalLM` and the checkpoint's
own transformers code (`remote/modeling_molmo.py`) both load.

vLLM builds Molmo's vision tower from a fixed config (336-px crops of 14-px patches, 23 layers of
width 1024, ~300M parameters), so only the language model (hidden 128, 2 layers, 2 heads / 1 KV head)
and the connector (2x2 attention pooling, SwiGLU projector) are tiny; the tower is saved in float16
to halve the file (both engines compute in float32). Each crop costs the tower's full price, so keep
`max_crops` at 1-2: an image is the global view plus that many crops.

Weights use the hub checkpoints' names (`model.transformer.blocks.N.att_proj`, `model.vision_backbone.
image_vit...`), which vLLM maps to its own; the transformers model uses them as they are.

- `build_tiny(path)`: writes the checkpoint (tokenizer, config, weights, remote code) into `path`;
- `tiny_checkpoint()`: the cached copy under `$VLM_BATCH_HOME/models/`, built once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

NAME = "tiny-molmo"
VERSION = "1"    # bump when the weights or configs change; the remote code's digest is added to it
REMOTE = Path(__file__).parent / "remote"
REMOTE_FILES = ("config_molmo.py", "image_preprocessing_molmo.py", "preprocessing_molmo.py", "modeling_molmo.py")
END = "<|endoftext|>"
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
ADDITIONAL_VOCAB = 128          # rows of `wte.new_embedding` (vLLM's ADDITIONAL_VOCAB_SIZE)
DEFAULT_MAX_CROPS = 2

# The language model and the connector: as small as vLLM's Molmo allows.
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=4096, layer_norm_eps=1e-6, rope_theta=1000000.0,
            qkv_bias=True, weight_tying=False, attention_layer_norm=False, norm_after=False,
            layer_norm_type="rms", clip_qkv=None, use_position_ids=True)
# The vision tower vLLM builds (VisionBackboneConfig); fixed, not read from the checkpoint.
VIT = dict(width=1024, layers=23, mlp=4096, patch=14, positions=577, pooled_layers=2)
STD_TEXT, STD_VIT = 0.2, 0.02
TOWER_DTYPE = "float16"


def _tokenizer():
    from vlm_batch_testing.tiny import train_tokenizer

    tok = train_tokenizer([END], eos_token=END, pad_token=END)
    base = len(tok)
    # Molmo's image tokens come after the base vocabulary: vLLM embeds them through `new_embedding`.
    tok.add_tokens(list(IMAGE_TOKENS), special_tokens=True)
    return tok, base


def _weights(embedding_size: int, patch_id: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    tower = getattr(torch, TOWER_DTYPE)

    def normal(*shape, std, dtype=torch.float32):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm_weight(n, dtype=torch.float32):
        return (1.0 + torch.randn(n, generator=g) * 0.02).to(dtype)

    d, inter = TEXT["hidden_size"], TEXT["intermediate_size"]
    heads, kv_heads = TEXT["num_attention_heads"], TEXT["num_key_value_heads"]
    head_dim = d // heads
    w = {}
    new_embedding = normal(ADDITIONAL_VOCAB, d, std=STD_TEXT)
    # The patch token's own embedding is zero: Molmo adds image features to it, vLLM puts them in
    # its place; with a zero row both give the same input.
    new_embedding[patch_id - embedding_size] = 0.0
    w["model.transformer.wte.embedding"] = normal(embedding_size, d, std=STD_TEXT)
    w["model.transformer.wte.new_embedding"] = new_embedding
    for i in range(TEXT["num_hidden_layers"]):
        p = f"model.transformer.blocks.{i}."
        w[p + "att_proj.weight"] = normal(d + 2 * kv_heads * head_dim, d, std=STD_TEXT)
        w[p + "att_proj.bias"] = normal(d + 2 * kv_heads * head_dim, std=STD_TEXT)
        w[p + "attn_out.weight"] = normal(d, d, std=STD_TEXT)
        w[p + "ff_proj.weight"] = normal(inter, d, std=STD_TEXT)
        w[p + "ff_out.weight"] = normal(d, inter // 2, std=STD_TEXT)
        w[p + "attn_norm.weight"] = norm_weight(d)
        w[p + "ff_norm.weight"] = norm_weight(d)
    w["model.transformer.ln_f.weight"] = norm_weight(d)
    w["model.transformer.ff_out.weight"] = normal(embedding_size, d, std=STD_TEXT)

    width, mlp = VIT["width"], VIT["mlp"]
    v = "model.vision_backbone."
    w[v + "image_vit.class_embedding"] = normal(width, std=width ** -0.5, dtype=tower)
    w[v + "image_vit.positional_embedding"] = normal(VIT["positions"], width, std=width ** -0.5, dtype=tower)
    w[v + "image_vit.patch_embedding.weight"] = normal(width, VIT["patch"] ** 2 * 3, std=STD_VIT, dtype=tower)
    w[v + "image_vit.pre_ln.weight"] = norm_weight(width, tower)
    w[v + "image_vit.pre_ln.bias"] = normal(width, std=STD_VIT, dtype=tower)
    for i in range(VIT["layers"]):
        p = f"{v}image_vit.transformer.resblocks.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            w[p + f"attention.{name}.weight"] = normal(width, width, std=STD_VIT, dtype=tower)
            w[p + f"attention.{name}.bias"] = normal(width, std=STD_VIT, dtype=tower)
        w[p + "feed_forward.w1.weight"] = normal(mlp, width, std=STD_VIT, dtype=tower)
        w[p + "feed_forward.w1.bias"] = normal(mlp, std=STD_VIT, dtype=tower)
        w[p + "feed_forward.w2.weight"] = normal(width, mlp, std=STD_VIT, dtype=tower)
        w[p + "feed_forward.w2.bias"] = normal(width, std=STD_VIT, dtype=tower)
        for name in ("attention_norm", "ffn_norm"):
            w[p + f"{name}.weight"] = norm_weight(width, tower)
            w[p + f"{name}.bias"] = normal(width, std=STD_VIT, dtype=tower)
    pooled = width * VIT["pooled_layers"]
    for name in ("wq", "wk", "wv"):
        w[v + f"image_pooling_2d.{name}.weight"] = normal(width, pooled, std=STD_VIT, dtype=tower)
        w[v + f"image_pooling_2d.{name}.bias"] = normal(width, std=STD_VIT, dtype=tower)
    w[v + "image_pooling_2d.wo.weight"] = normal(width, width, std=STD_VIT, dtype=tower)
    w[v + "image_pooling_2d.wo.bias"] = normal(width, std=STD_VIT, dtype=tower)
    w[v + "pad_embed"] = normal(2, pooled, std=STD_VIT, dtype=tower)
    # The connector's projector (SwiGLU: w1 gate, w3 up, w2 down) maps into the tiny language model.
    w[v + "image_projector.w1.weight"] = normal(inter // 2, width, std=STD_TEXT)
    w[v + "image_projector.w3.weight"] = normal(inter // 2, width, std=STD_TEXT)
    w[v + "image_projector.w2.weight"] = normal(d, inter // 2, std=STD_TEXT)
    return w


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_tiny(path, max_crops: int = DEFAULT_MAX_CROPS) -> None:
    """Write a tiny Molmo into `path`: tokenizer, config.json, preprocessor/processor configs,
    generation_config.json, model.safetensors and the remote code, with the hub's `auto_map`."""
    import importlib.util

    from safetensors.torch import save_file
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok, base = _tokenizer()
    tok.save_pretrained(path)
    end, patch = tok.convert_tokens_to_ids(END), tok.convert_tokens_to_ids("<im_patch>")
    assert all(base <= tok.convert_tokens_to_ids(t) < base + ADDITIONAL_VOCAB for t in IMAGE_TOKENS)

    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE / name, path / name)
    spec = importlib.util.spec_from_file_location("_tiny_molmo_config", REMOTE / "config_molmo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.MolmoConfig(
        vocab_size=base, embedding_size=base, initializer_range=STD_TEXT, use_cache=True,
        bos_token_id=None, eos_token_id=end, pad_token_id=end, architectures=["MolmoForCausalLM"],
        auto_map={"AutoConfig": "config_molmo.MolmoConfig",
                  "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
        dtype="float32", **TEXT)
    config.save_pretrained(path)
    GenerationConfig(eos_token_id=end, pad_token_id=end).save_pretrained(path)

    processor_map = {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"}
    _write_json(path / "preprocessor_config.json", {
        "auto_map": {"AutoImageProcessor": "image_preprocessing_molmo.MolmoImageProcessor", **processor_map},
        "image_processor_type": "MolmoImageProcessor", "processor_class": "MolmoProcessor",
        "max_crops": max_crops, "overlap_margins": [4, 4], "base_image_input_size": [336, 336],
        "image_token_length_w": 12, "image_token_length_h": 12, "image_patch_size": 14,
        "image_padding_mask": True, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]})
    _write_json(path / "processor_config.json", {"auto_map": processor_map, "processor_class": "MolmoProcessor"})
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = processor_map
    _write_json(path / "tokenizer_config.json", tok_config)

    save_file(_weights(base, patch), str(path / "model.safetensors"), metadata={"format": "pt"})


def version() -> str:
    """VERSION plus a digest of the remote code, so an edit there builds a fresh checkpoint."""
    digest = hashlib.sha256()
    for name in REMOTE_FILES:
        digest.update((REMOTE / name).read_bytes())
    return f"{VERSION}.{digest.hexdigest()[:8]}"


def tiny_checkpoint() -> str:
    """The tiny Molmo's folder, built once under `$VLM_BATCH_HOME/models/` (about 5 s, 572 MB)."""
    from vlm_batch_testing.tiny import ensure_checkpoint

    return ensure_checkpoint(NAME, build_tiny, version=version())
