"""VLMEvalKit's own inference loop, for comparison: its model class on its own vLLM engine, a row at a time,
as `infer_data` runs it (`vlm-batch bench` measures it beside ours)."""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
import sys

from .registry import card_class, vlmeval_entry


def has_vllm_path(card) -> bool:
    """VLMEvalKit has a vLLM path for this model: its class takes `use_vllm` and builds `vllm.LLM`."""
    import inspect

    cls = card_class(card)
    if cls is None:
        return False
    try:
        return "use_vllm" in inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return False


class VLMEvalLoop:
    """VLMEvalKit's own inference, as `infer_data` runs it: its model class (use_vllm=True) builds
    its own `vllm.LLM` (its own max_num_seqs) and is asked one row at a time, with the prompt
    `infer_data` would choose. Off-GPU, its engine gets this machine's settings (float32, eager, one
    process, the model's context) and its GPU check is told of a GPU: both are what let it run here.
    """

    def __init__(self, card, dataset, options: dict, answer_tokens: int | None = None, warm: bool = False):
        import vllm

        from ..engines import environment
        from ..engines.vllm import engine_args

        environment.prepare()
        entry = None if card.vlmeval_class else vlmeval_entry(card.prompt_name)
        cls = getattr(entry, "func", entry) or card_class(card)   # a card of a class: its options are the arguments
        module = sys.modules[cls.__module__]
        ours = {k: v for k, v in engine_args(card, **{k: v for k, v in options.items()
                                                      if k not in ("batch_size", "verbose")}).items()
                if k not in ("model", "max_num_seqs")}
        real = vllm.LLM

        def llm(**kwargs):
            kwargs.pop("gpu_memory_utilization", None)
            kwargs.pop("max_model_len", None)   # VLMEvalKit asks 32768; the model's own applies
            return real(**{**kwargs, **ours})

        saved = getattr(module, "get_gpu_memory", None)
        vllm.LLM = llm
        if saved is not None:
            module.get_gpu_memory = lambda: [80_000]
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.model = cls(**{**getattr(entry, "keywords", {}), **card.options, "model_path": card.path(),
                                    "use_vllm": True})
        finally:
            vllm.LLM = real
            if saved is not None:
                module.get_gpu_memory = saved
        vars(dataset).pop("dump_image", None)   # VLMEvalKit's own dump, not our faster one (prompts.fast_dump)
        self.dataset, self.name, self.warm = dataset, dataset.dataset_name, warm
        self.model.set_dump_image(dataset.dump_image)
        # Its per-call progress bar only draws; vLLM 0.32 divides by its elapsed time, which is 0 on a
        # fast item (ZeroDivisionError), so the bar is off.
        llm = self.model.llm
        generate = functools.partial(llm.generate, use_tqdm=False)

        def forced(*args, sampling_params=None, **kwargs):
            """Every answer exactly `answer_tokens` long, as bench's other modes."""
            if answer_tokens and sampling_params is not None:
                sampling_params = sampling_params.clone()
                sampling_params.max_tokens = sampling_params.min_tokens = answer_tokens
            return generate(*args, sampling_params=sampling_params, **kwargs)

        llm.generate = forced

    def __call__(self):
        from ..request import Result

        model, dataset, out = self.model, self.dataset, []
        if not self.warm:   # cold, as the pipeline's rounds
            shutil.rmtree(dataset.img_root, ignore_errors=True)
        custom = hasattr(model, "use_custom_prompt") and model.use_custom_prompt(self.name)
        with contextlib.redirect_stdout(io.StringIO()):   # it prints a line per item
            for i in range(len(dataset.data)):
                line = dataset.data.iloc[i]
                struct = model.build_prompt(line, dataset=self.name) if custom else dataset.build_prompt(line)
                out.append(Result(index=line["index"], text=model.generate(message=struct, dataset=self.name)))
        return out

    def close(self) -> None:
        from ..engines.vllm import stop

        llm = getattr(self.model, "llm", None)
        if llm is not None:
            self.model.llm = None
            stop(llm)
