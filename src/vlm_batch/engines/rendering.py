"""vLLM's rendering of a request (its multimodal processing and tokenizing), done where the request is
prepared: in the preparation workers, on their cores, instead of in the one process that feeds the
engine. At a real 7B model's pixel bounds one 1024x768 photo costs about 9.5 ms of CPU to render; in the
feeding process that caps the whole run near 40 items/s on any number of cores.

A worker builds vLLM's renderer from the engine's own arguments, so it renders exactly what the
engine's process would. The result (vLLM's `EngineInput`) travels back tagged with those arguments'
key; its tensors go through shared memory. The engine takes a request rendered for its own key as it
is, and renders anything else itself.

Every worker renders, even one alone. At those bounds (2 cores, 128 photos, feed ceiling) one worker
fed 32.1-32.6 items/s rendering against 25.8-26.8 leaving it to the feeding process, two workers
60.3-61.8 against 46.0-54.1.

Only where vLLM's processed-image cache is off: that cache mirrors, in the engine's process, what the
one rendering process has sent, and inputs rendered elsewhere would break the mirror.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)
IGNORED = ("distributed_executor_backend",)   # how the engine runs, not what it renders
# A rendered request's tensors arrive in shared memory, each holding an open file descriptor (about 3 a
# photo) until the engine has sent them on. Requests prepared ahead (a few hundred) need this many.
DESCRIPTORS = 4096
WANTED_DESCRIPTORS = 65535   # what vLLM's server raises its own limit to


def vllm_prompt(request) -> dict:
    """A Request as vLLM's prompt: its text, its images and its processor arguments."""
    prompt = {"prompt": request.prompt}
    if request.images:
        prompt["multi_modal_data"] = {"image": request.images}
    if request.mm_kwargs:
        prompt["mm_processor_kwargs"] = request.mm_kwargs
    return prompt


def key_of(args: dict) -> str:
    return json.dumps({k: v for k, v in args.items() if k not in IGNORED}, sort_keys=True, default=str)


def cache_off(args: dict) -> bool:
    return args.get("mm_processor_cache_gb", 4) == 0


def room_for_descriptors() -> bool:
    """Raise this process's open-file limit as vLLM's server does; False where it stays under DESCRIPTORS."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= WANTED_DESCRIPTORS:
        return True
    target = WANTED_DESCRIPTORS if hard == resource.RLIM_INFINITY else min(WANTED_DESCRIPTORS, hard)
    try:
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (ValueError, OSError) as exc:
        log.debug("open-file limit left at %s: %s", soft, exc)
    if soft < DESCRIPTORS:
        log.info("the engine's process renders: %d open files allowed, rendering in workers needs %d",
                 soft, DESCRIPTORS)
    return soft >= DESCRIPTORS


class Rendering:
    """Renders requests as the engine started with `args` would; built lazily, in the process that
    renders (a worker), where it costs about 0.6 s, beside the engine's own start."""

    def __init__(self, args: dict, wanted=None):
        self.args, self.key = dict(args), key_of(args)
        self._wanted = wanted
        self._renderer = None
        self.broken: str | None = None   # why this process cannot render: the engine renders instead

    @classmethod
    def of(cls, args: dict, wanted=None) -> "Rendering | None":
        return cls(args, wanted) if cache_off(args) else None

    def wanted(self) -> bool:
        """Whether the engine is still to be vLLM's (the one asking may fall back to transformers)."""
        return self._wanted is None or self._wanted()

    def _build(self):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.renderers.inputs.preprocess import parse_model_prompt
        from vllm.renderers.registry import renderer_from_config

        config = EngineArgs(**self.args).create_engine_config()
        renderer = renderer_from_config(config)
        model_config = config.model_config
        return lambda request: renderer.render_cmpl([parse_model_prompt(model_config, vllm_prompt(request))])[0]

    def __call__(self, request) -> bool:
        """Render `request` in place: vLLM's input set, its images dropped (the engine needs them no
        more, and they would cost more to send back than to render). False where it could not: the
        request is left as it was, and the engine renders it, or fails it with vLLM's own error."""
        if self.broken:
            return False
        try:
            if self._renderer is None:
                self._renderer = self._build()
        except Exception as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("a preparation worker cannot render for vLLM (%s); the engine's process renders",
                        self.broken)
            return False
        try:
            rendered = self._renderer(request)
        except Exception as exc:   # a bad item: vLLM, rendering it again, fails it with this error
            log.debug("item %s of %s: rendering left to the engine: %s", request.index, request.dataset, exc)
            return False
        request.rendered = (self.key, rendered)
        request.image_count, request.images = len(request.images), []
        return True
