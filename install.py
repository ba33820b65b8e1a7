"""Run at install: by AUTOMATIC1111 and Forge at launch (with their ``launch`` module), and by ComfyUI-Manager with plain
Python in this folder after an install or update. AlignIT needs only what each ships; A1111 and Forge get safetensors
if it is missing, ComfyUI (which ships it) gets nothing."""

try:
    import launch
except ImportError:  # ComfyUI-Manager (comfyui_manager/glob/manager_core.py try_install_script): nothing to install
    launch = None

if launch is not None and not launch.is_installed("safetensors"):
    launch.run_pip("install safetensors", "safetensors for AlignIT")
