"""The remote code a tiny Molmo checkpoint ships (copied into the checkpoint folder, loaded with
`trust_remote_code=True`): config, image processor, processor and the transformers model.

Written for vlm-batch from Molmo's published design and from the interface vLLM's `MolmoForCausalLM`
calls; not AI2's code. The modules import each other only relatively, as remote code must.
"""
