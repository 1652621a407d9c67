"""Molmo for transformers, written from the architecture (and checked against vLLM's
`MolmoForCausalLM` on the same weights):

- vision: a CLIP-style ViT (14-px patches of 336-px crops, class token, learned positions, pre-LN,
  23 pre-norm blocks of width 1024, quick-GELU MLPs); the hidden states after blocks -2 and -9,
  concatenated, class token dropped, crops made only of padding zeroed; learned padding embeddings
  added where a patch is all (or partly) padding; 2x2 windows pooled by one attention whose query
  is the window's mean; a SwiGLU projector into the language model's width;
- text: a decoder of pre-norm blocks (RMSNorm, fused QKV with bias, RoPE, grouped KV heads,
  SwiGLU MLP with one fused gate/up projection: first half value, second half gate), a final
  RMSNorm and an untied output layer; the embedding is `embedding` plus `new_embedding` (the image
  tokens' rows);
- image features are added to the embeddings of the `<im_patch>` tokens at `image_input_idx`.

Parameter names are the hub checkpoints' (`model.transformer.blocks.N.att_proj`, ...).
`generate_from_batch(batch, generation_config, **kwargs)` takes Molmo's batch (right-padded with -1:
`input_ids`, `images`, `image_masks`, `image_input_idx`) and returns the prompt as given followed by
the new tokens.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config_molmo import MolmoConfig

# The vision tower's shape: fixed by the architecture.
VIT_WIDTH, VIT_HEADS, VIT_LAYERS, VIT_MLP, VIT_PATCH, VIT_POSITIONS = 1024, 16, 23, 4096, 14, 577
CROP_PATCHES = 24
FEATURE_LAYERS = (-2, -9)
POOLING = 2
ADDITIONAL_VOCAB = 128


class MolmoEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, num_new_embeddings: int, features: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_embeddings, features))
        self.new_embedding = nn.Parameter(torch.zeros(num_new_embeddings, features))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, torch.cat([self.embedding, self.new_embedding], dim=0))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ViTMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(VIT_WIDTH, VIT_MLP)
        self.w2 = nn.Linear(VIT_MLP, VIT_WIDTH)

    def forward(self, x):
        return self.w2(quick_gelu(self.w1(x)))


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention over `inputs_kv` (itself by default), inputs `in_layers` x 1024 wide."""

    def __init__(self, in_layers: int = 1):
        super().__init__()
        self.heads, self.head_dim = VIT_HEADS, VIT_WIDTH // VIT_HEADS
        self.wq = nn.Linear(in_layers * VIT_WIDTH, VIT_WIDTH)
        self.wk = nn.Linear(in_layers * VIT_WIDTH, VIT_WIDTH)
        self.wv = nn.Linear(in_layers * VIT_WIDTH, VIT_WIDTH)
        self.wo = nn.Linear(VIT_WIDTH, VIT_WIDTH)

    def forward(self, inputs_q, inputs_kv=None):
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        b, lq, lk = inputs_q.shape[0], inputs_q.shape[1], inputs_kv.shape[1]
        q = self.wq(inputs_q).view(b, lq, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(inputs_kv).view(b, lk, self.heads, self.head_dim).transpose(1, 2)
        v = self.wv(inputs_kv).view(b, lk, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(b, lq, VIT_WIDTH))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.attention = MultiHeadDotProductAttention()
        self.feed_forward = ViTMLP()
        self.attention_norm = nn.LayerNorm(VIT_WIDTH, eps=eps)
        self.ffn_norm = nn.LayerNorm(VIT_WIDTH, eps=eps)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class BlockCollection(nn.Module):
    def __init__(self):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock() for _ in range(VIT_LAYERS)])

    def forward(self, x):
        states = []
        for block in self.resblocks:
            x = block(x)
            states.append(x)
        return states


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(VIT_WIDTH))
        self.positional_embedding = nn.Parameter(torch.zeros(VIT_POSITIONS, VIT_WIDTH))
        self.patch_embedding = nn.Linear(VIT_PATCH * VIT_PATCH * 3, VIT_WIDTH, bias=False)
        self.pre_ln = nn.LayerNorm(VIT_WIDTH, eps=1e-5)
        self.transformer = BlockCollection()

    def forward(self, patches):
        x = self.patch_embedding(patches)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding[None].to(x.dtype)
        return self.transformer(self.pre_ln(x))


class ImageProjector(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(VIT_WIDTH, inner, bias=False)
        self.w3 = nn.Linear(VIT_WIDTH, inner, bias=False)
        self.w2 = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoVisionBackbone(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.image_vit = VisionTransformer()
        self.image_pooling_2d = MultiHeadDotProductAttention(in_layers=len(FEATURE_LAYERS))
        self.image_projector = ImageProjector(config)
        self.pad_embed = nn.Parameter(torch.zeros(2, VIT_WIDTH * len(FEATURE_LAYERS)))

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """(crops, 576, 588) pixels and (crops, 576) masks -> (crops, 144, hidden) features."""
        dtype = self.image_vit.patch_embedding.weight.dtype
        images = images.to(dtype)
        padding_crop = (images == -1).all(dim=-1).all(dim=-1)
        states = self.image_vit(images)
        feats = torch.cat([states[i] for i in FEATURE_LAYERS], dim=-1)[:, 1:]
        feats = feats * (~padding_crop).to(feats.dtype)[:, None, None]
        all_pad = (image_masks == 0).to(feats.dtype)
        partial_pad = ((image_masks < 1) & (image_masks != 0)).to(feats.dtype)
        feats = feats + self.pad_embed[0] * all_pad[..., None] + self.pad_embed[1] * partial_pad[..., None]
        n, side, chans = feats.shape[0], CROP_PATCHES // POOLING, feats.shape[-1]
        windows = feats.view(n, side, POOLING, side, POOLING, chans).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(n * side * side, POOLING * POOLING, chans)
        pooled = self.image_pooling_2d(windows.mean(dim=1, keepdim=True), windows)
        return self.image_projector(pooled.view(n, side * side, VIT_WIDTH))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class MolmoBlock(nn.Module):
    def __init__(self, config: MolmoConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.heads
        d = config.hidden_size
        self.att_proj = nn.Linear(d, d + 2 * self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.intermediate_size, bias=False)
        self.ff_out = nn.Linear(config.intermediate_size // 2, d, bias=False)
        self.attn_norm = RMSNorm(d, config.layer_norm_eps)
        self.ff_norm = RMSNorm(d, config.layer_norm_eps)
        self.norm_after = config.norm_after
        if config.attention_layer_norm:
            self.q_norm = RMSNorm(d, config.layer_norm_eps)
            self.k_norm = RMSNorm(self.kv_heads * self.head_dim, config.layer_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def attention(self, x, cos, sin, mask, cache):
        b, length, _ = x.shape
        q, k, v = self.att_proj(x).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.attn_out(out.transpose(1, 2).reshape(b, length, -1))

    def mlp(self, x):
        value, gate = self.ff_proj(x).chunk(2, dim=-1)
        return self.ff_out(F.silu(gate) * value)

    def forward(self, x, cos, sin, mask, cache):
        if self.norm_after:
            x = x + self.attn_norm(self.attention(x, cos, sin, mask, cache))
            return x + self.ff_norm(self.mlp(x))
        x = x + self.attention(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.ff_norm(x))


class MolmoModel(nn.Module):
    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=MolmoEmbedding(config.embedding_size or config.vocab_size, ADDITIONAL_VOCAB, config.hidden_size),
            blocks=nn.ModuleList([MolmoBlock(config, i) for i in range(config.num_hidden_layers)]),
            ln_f=RMSNorm(config.hidden_size, config.layer_norm_eps),
        ))
        if not config.weight_tying:
            self.transformer["ff_out"] = nn.Linear(config.hidden_size, config.embedding_size or config.vocab_size,
                                                   bias=False)
        self.vision_backbone = MolmoVisionBackbone(config)

    def rope(self, position_ids: torch.Tensor, dtype):
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        theta = (self.config.rope_parameters or {}).get("rope_theta", self.config.rope_theta)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device)
                                    / head_dim))
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def image_features(self, images, image_masks, image_input_idx):
        """The projected features of the crops that feed any token (padding crops are skipped)."""
        b, crops = images.shape[:2]
        used = (image_input_idx >= 0).any(dim=-1).view(-1)
        flat = images.view(b * crops, *images.shape[2:])[used]
        masks = image_masks.view(b * crops, -1)[used]
        return used, self.vision_backbone(flat, masks)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None,
                images=None, image_masks=None, image_input_idx=None):
        x = self.transformer.wte(input_ids.clamp(min=0))
        if images is not None and image_input_idx is not None and (image_input_idx >= 0).any():
            used, feats = self.image_features(images, image_masks, image_input_idx)
            b, crops, per_crop = image_input_idx.shape
            rows = torch.arange(b, device=x.device).repeat_interleave(crops)[used]
            idx = image_input_idx.view(b * crops, per_crop)[used]
            keep = idx >= 0
            batch_idx = rows[:, None].expand_as(idx)[keep]
            x = x.index_put((batch_idx, idx[keep]), feats[keep].to(x.dtype), accumulate=True)

        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        length = x.shape[1]
        query_pos = torch.arange(past, past + length, device=x.device)
        key_pos = torch.arange(past + length, device=x.device)
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
        mask = mask | ~mask.any(dim=-1, keepdim=True)          # rows of padding attend anywhere (unused)
        cos, sin = self.rope(position_ids, x.dtype)
        for block in self.transformer.blocks:
            x = block(x, cos, sin, mask, past_key_values)
        return self.transformer.ln_f(x)


class MolmoPreTrainedModel(PreTrainedModel):
    config_class = MolmoConfig
    base_model_prefix = "model"
    _no_split_modules = ["MolmoBlock", "ResidualAttentionBlock"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, MolmoEmbedding):
            nn.init.normal_(module.embedding, std=std)
            nn.init.normal_(module.new_embedding, std=std)


class MolmoForCausalLM(MolmoPreTrainedModel, GenerationMixin):
    def __init__(self, config: MolmoConfig):
        super().__init__(config)
        self.model = MolmoModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                images=None, image_masks=None, image_input_idx=None, labels=None, use_cache=None,
                logits_to_keep: int = 0, **kwargs):
        if attention_mask is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        hidden = self.model(input_ids, attention_mask, position_ids, past_key_values if use_cache else None,
                            images, image_masks, image_input_idx)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        head = self.model.transformer["ff_out"] if "ff_out" in self.model.transformer else None
        logits = head(hidden) if head is not None else F.linear(hidden, self.model.transformer.wte.embedding)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, images=None,
                                      image_masks=None, image_input_idx=None, **kwargs):
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:       # generate drops a mask of all ones
            attention_mask = torch.ones_like(input_ids)
        if past:
            input_ids = input_ids[:, past:]
            images = image_masks = image_input_idx = None    # the image went in with the prompt
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past_key_values, images=images, image_masks=image_masks,
                    image_input_idx=image_input_idx, use_cache=True, logits_to_keep=1)

    @torch.no_grad()
    def generate_from_batch(self, batch, generation_config=None, **kwargs):
        """Molmo's batched generation: `batch` right-padded with -1 (as Molmo's collation pads);
        returns (batch, prompt width + new tokens), the prompt columns as given."""
        input_ids = batch["input_ids"]
        if input_ids.dim() == 1:
            batch = {k: v.unsqueeze(0) for k, v in batch.items()}
            input_ids = batch["input_ids"]
        valid = input_ids != -1
        lengths = valid.sum(-1)
        width = input_ids.shape[1]
        shift = width - lengths
        # Left-pad for the decoder (each row's tokens end at the last column); features move along.
        pad = self.generation_config.pad_token_id
        pad = 0 if pad is None else pad
        left = torch.full_like(input_ids, pad)
        mask = torch.zeros_like(input_ids)
        for row in range(input_ids.shape[0]):
            n = int(lengths[row])
            left[row, width - n:] = input_ids[row, valid[row]]
            mask[row, width - n:] = 1
        extra = {}
        if batch.get("images") is not None:
            idx = batch["image_input_idx"]
            idx = torch.where(idx >= 0, idx + shift.view(-1, *([1] * (idx.dim() - 1))), idx)
            extra = dict(images=batch["images"], image_masks=batch.get("image_masks"), image_input_idx=idx)
            if extra["image_masks"] is None:
                extra["image_masks"] = torch.ones(batch["images"].shape[:-1], dtype=batch["images"].dtype,
                                                  device=input_ids.device)
        out = self.generate(input_ids=left, attention_mask=mask, generation_config=generation_config,
                            **extra, **kwargs)
        return torch.cat([input_ids, out[:, width:]], dim=1)
