"""Imported by the forkserver vLLM's engine processes are forked from (see `processes.start_forkserver`)."""

from vlm_batch.quiet import here
from vlm_batch.engines.processes import die_with_parent

here()   # before the imports below: what they and the forked engine print, unless --verbose
die_with_parent()   # the forkserver ends with us, and its engine processes with it

from vllm import LLM, SamplingParams   # noqa: F401,E402
import vllm.v1.engine.core   # noqa: F401,E402
import vllm.v1.executor.uniproc_executor   # noqa: F401,E402
