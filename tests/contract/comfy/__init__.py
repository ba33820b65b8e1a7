"""A contract of ComfyUI (v0.8.0, comfyanonymous/ComfyUI fc0cb10b): the ``comfy`` modules AlignIT's ComfyUI host
calls, with their real signatures and, where AlignIT's results depend on it, their behaviour mirrored small (each
module cites the file and lines). Text encoders are transformers CLIP models, UNets the ldm UNet A1111 runs (the
same layer names as ComfyUI's ``comfy.ldm``); tests/test_comfyui_integration.py checks the same results on a real
ComfyUI."""
