"""The hooks a model plugin implements: `BatchCapableModel`.

Each plugin answers only for its own cards and returns None otherwise, so `firstresult` picks it.
"""

import pluggy

hookspec = pluggy.HookspecMarker("vlm_batch")
hookimpl = pluggy.HookimplMarker("vlm_batch")


class BatchCapableModel:
    @hookspec
    def vlm_batch_models(self):
        """Return the ModelCards this plugin serves."""

    @hookspec(firstresult=True)
    def vlm_batch_prepare(self, card, message, dataset):
        """Turn one VLMEvalKit message (images decoded) into one engine Request."""

    @hookspec(firstresult=True)
    def vlm_batch_generate(self, card, engine, requests):
        """Yield one Result per Request, each naming its request; the core keeps the order."""

    @hookspec(firstresult=True)
    def vlm_batch_postprocess(self, card, request, text):
        """Return the prediction to record for a generated text (the core's default: unchanged)."""

    @hookspec(firstresult=True)
    def vlm_batch_hf_batch(self, card, engine, requests):
        """Run one batch on the transformers engine when the checkpoint brings its own generate code."""

    @hookspec(firstresult=True)
    def vlm_batch_estimate_memory(self, card, request):
        """Return the device bytes one Request needs while it runs."""

    @hookspec(firstresult=True)
    def vlm_batch_image_tokens(self, card, width, height):
        """Return how many tokens the model's processor makes of one image of this size."""
