"""The core's own hook implementations; plugins override them only for what is model-specific."""

from .hookspecs import hookimpl


@hookimpl(trylast=True)
def vlm_batch_generate(card, engine, requests):
    return engine.generate(requests)


@hookimpl(trylast=True)
def vlm_batch_estimate_memory(card, request):
    from .memory import estimate_request_bytes

    return estimate_request_bytes(card, request)


@hookimpl(trylast=True)
def vlm_batch_image_tokens(card, width, height):
    from .memory import default_image_tokens

    return default_image_tokens(card, width, height)
