"""Imported by the forkserver vLLM's engine processes are forked from (see `processes.start_forkserver`)."""

from vlm_batch.quiet import here

here()   # before the imports below: what they and the forked engine print, unless --verbose

from vllm import LLM, SamplingParams   # noqa: F401
import vllm.v1.engine.core   # noqa: F401
import vllm.v1.executor.uniproc_executor   # noqa: F401
