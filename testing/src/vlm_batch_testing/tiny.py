"""Tiny local checkpoints of real architectures, so demos and tests never touch a model hub.

Plugins describe the architecture (config, special tokens, chat template); this module trains a
small byte-level BPE tokenizer on local text and saves everything atomically, once, under the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from vlm_batch.engines.environment import cache_dir
from vlm_batch.demo.sample_data import corpus as default_corpus


def train_tokenizer(special_tokens: list[str], *, chat_template: str | None = None,
                    vocab_size: int = 512, corpus: list[str] | None = None, **named_tokens):
    """A byte-level BPE tokenizer trained here, with the family's special tokens as single ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named_tokens)
    if chat_template:
        fast.chat_template = chat_template
    return fast


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_checkpoint(name: str, build: Callable[[Path], None], version: str = "1") -> str:
    """Build `name` with `build(tmpdir)` unless a finished copy exists; safe across processes."""
    target = cache_dir() / "models" / f"{name}-v{version}"
    if (target / "config.json").exists():
        return str(target)
    with _lock(target):
        if (target / "config.json").exists():
            return str(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def randomize(model, std: float = 0.2) -> None:
    """Every weight matrix drawn again at `std`: large enough that answers vary with the image and the
    question (at 0.05 with a tiny vocabulary every output collapses to one repeated token)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)


def save_model(model, path, eos, pad: int) -> None:
    """The model with the generation config a hub checkpoint ships: its end tokens and its pad token."""
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(path)
