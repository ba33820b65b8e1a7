"""Concept sources on disk: LoRA factors and Custom Diffusion deltas, loaded without executing pickled code."""
