"""What a run is told, from the command line (`cli`) or a library call (`runner`): one object, built
once, read by the plan, the suite and the executor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .vlmeval import DEFAULT_JUDGE


@dataclass
class Settings:
    models: list = field(default_factory=list)      # model names; none: the embedded demo model
    datasets: list = field(default_factory=list)    # dataset names; none: the sample suite
    kind: str | None = None            # --kind: local TSVs are datasets of this kind
    config: str | None = None          # a VLMEvalKit-style JSON of models and datasets instead of names
    engine: str = "auto"               # auto | vllm | hf
    work_dir: str = "./outputs"
    mode: str = "all"                  # all | infer | eval
    rerun: bool = False
    wait: bool = False
    judge: str = DEFAULT_JUDGE
    judge_base_url: str | None = None  # a judge server the user runs (VLMEvalKit's --judge-base-url)
    judge_nproc: int = 64              # concurrent calls to a local or --judge-base-url judge
    judge_gpu_share: float | None = None   # a local judge's GPU memory share: it then runs beside the engine
    nproc: int = 4                     # VLMEvalKit's judge processes (API judges)
    batch_size: int | None = None      # sequences the engine runs at once
    max_batch_memory: int | None = None    # bytes a transformers batch may use
    limit: int | None = None           # only the first N rows of each dataset
    trust_remote_code: bool = False
    prep_workers: int | None = None   # None: engines.threads.prep_workers decides
    strict: bool = False               # exit 1 when any item failed
    truncate: bool = False             # cut over-long prompts' text to fit, instead of failing them
    tp: int = 1                        # GPUs per engine (vLLM tensor parallel)
    ray: Any = None                    # placement.ray.RayOptions: replicas on a Ray cluster
    verbose: bool = False

    def engine_options(self) -> dict:
        """What every engine of the run is started with (a config's model entry may add to it)."""
        options = {"batch_size": self.batch_size, "trust_remote_code": self.trust_remote_code,
                   "verbose": self.verbose}
        if self.max_batch_memory:
            options["max_batch_memory"] = self.max_batch_memory
        if self.tp > 1:
            options["tensor_parallel_size"] = self.tp
        return options
