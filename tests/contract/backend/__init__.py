"""The contract of Forge's ``backend`` package (lllyasviel/stable-diffusion-webui-forge main, dfdcbab6): only what
AlignIT's Forge host calls, with the real signatures; each module cites the file and lines it mirrors."""
