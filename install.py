"""Run by the WebUI at install and launch: AlignIT needs only what the WebUI ships (torch, gradio, safetensors)."""

import launch

if not launch.is_installed("safetensors"):
    launch.run_pip("install safetensors", "safetensors for AlignIT")
