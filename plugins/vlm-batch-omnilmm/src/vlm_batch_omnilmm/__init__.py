"""OmniLMM and its successor MiniCPM-V for vlm-batch: one distribution, one module (and entry point)
per family, `omnilmm` and `minicpmv`."""
