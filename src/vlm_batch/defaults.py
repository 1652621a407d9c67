"""The core's own hook implementations; plugins override them only for what is model-specific."""

from .hookspecs import hookimpl


@hookimpl(trylast=True)
def vlm_batch_generate(card, engine, requests):
    return engine.generate(requests)


@hookimpl(trylast=True)
def vlm_batch_estimate_memory(card, request):
    from .memory import estimate_kv

    return estimate_kv(card, request)   # every layer full attention; ViT-patch images
