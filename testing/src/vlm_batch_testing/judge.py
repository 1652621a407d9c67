"""A tiny text LLM that judges with a known behaviour: it answers one fixed letter to any prompt.

Tests and the judge benchmark serve it with vLLM's OpenAI-compatible server as VLMEvalKit's judge.
Whatever the judge prompt, it answers `LETTER`, so the score VLMEvalKit computes through it is known
in advance and differs from exact matching's: a test can tell whether the judge's answers were used.
Built from transformers' own Mistral classes (a plain decoder no model family of ours uses), a tokenizer trained here, and a few seconds of training.
"""

from __future__ import annotations

import random
from pathlib import Path

from .tiny import ensure_checkpoint, train_tokenizer

LETTER = "B"
NAME = "tiny-judge"
END = "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", END]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_LEN = 4096   # VLMEvalKit's judge asks for max_tokens=2048 on top of a prompt of a few hundred tokens


def _prompts(rng: random.Random, n: int) -> list[str]:
    """Varied user turns: VLMEvalKit's judge phrasing, options, answers, greetings, noise."""
    from vlm_batch.demo.sample_data import corpus

    words = list(dict.fromkeys(corpus()))
    out = ["hello", "Hello!", ""]
    while len(out) < n:
        out.append(" ".join(rng.choice(words).strip() for _ in range(rng.randint(1, 120))))
    return out


def build(path: Path, steps: int = 60, seed: int = 0) -> None:
    """Train the tiny decoder (2 layers, hidden 64) to answer `LETTER` and stop, then save it."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    tok = train_tokenizer(SPECIAL_TOKENS, chat_template=CHAT_TEMPLATE, eos_token=END, pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=MAX_LEN, sliding_window=None, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids[END], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    model = MistralForCausalLM(config).to(torch.float32)
    rng = random.Random(seed)
    answer = tok(LETTER + END, add_special_tokens=False)["input_ids"]
    examples = []
    for text in _prompts(rng, 64):
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
        ids_ = tok(prompt, add_special_tokens=False)["input_ids"][-1024:]
        examples.append((ids_, answer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with torch.inference_mode(False), torch.enable_grad():   # an engine in this process may have turned grad off
        _train(model, opt, examples, steps, config.pad_token_id)
    model.eval()
    model.generation_config.eos_token_id = ids[END]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _train(model, opt, examples, steps: int, pad: int) -> None:
    import torch

    for step in range(steps):
        batch = [examples[(step * 8 + i) % len(examples)] for i in range(8)]
        width = max(len(p) + len(a) for p, a in batch)
        inputs = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, a) in enumerate(batch):
            seq = p + a
            inputs[row, :len(seq)] = torch.tensor(seq)
            labels[row, len(p):len(seq)] = torch.tensor(a)
            mask[row, :len(seq)] = 1
        loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def checkpoint() -> str:
    """The trained tiny judge, built once under the cache (`VLM_BATCH_HOME`)."""
    return ensure_checkpoint(NAME, build, version="2")
