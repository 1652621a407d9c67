"""The embedded default: the sample sets (drawn shapes, one per kind VLMEvalKit scores) and the demo
model, the card a plugin marks `demo` (its weights ship in that plugin)."""

from __future__ import annotations


def demo_card(cards: dict):
    """The card `vlm-batch eval` runs with no --model, or None when no installed plugin ships one."""
    return next((card for card in cards.values() if card.demo), None)
