"""The hooks a model plugin implements: `BatchCapableModel`.

Each plugin answers only for its own cards and returns None otherwise, so `firstresult` picks it.
The core's defaults (`defaults.py`) answer for any card no plugin claims.
"""

import pluggy

hookspec = pluggy.HookspecMarker("vlm_batch")
hookimpl = pluggy.HookimplMarker("vlm_batch")


class BatchCapableModel:
    @hookspec
    def vlm_batch_models(self):
        """Return the ModelCards this plugin serves."""

    @hookspec(firstresult=True)
    def vlm_batch_vlmeval_card(self, entry):
        """A ModelCard for a model of a VLMEvalKit class this plugin names in its module's
        `VLMEVAL_CLASSES` (`entry`: a `vlmeval.registry.Entry`: a `supported_VLM` entry, a user's config
        entry, or a checkpoint by its architecture), applying the class's arguments as the class does;
        or `Unserved(entry.name, reason)` for one it cannot run. Called for the plugin's own classes only."""

    @hookspec(firstresult=True)
    def vlm_batch_prepare(self, card, message, dataset):
        """Turn one VLMEvalKit message (images decoded) into one engine Request."""

    @hookspec(firstresult=True)
    def vlm_batch_generate(self, card, engine, requests):
        """Yield one finished Result per Request (the prediction to record), in any order."""

    @hookspec(firstresult=True)
    def vlm_batch_estimate_memory(self, card, request):
        """Return the KV-cache bytes one Request holds at its longest (prompt, images, new tokens)."""
