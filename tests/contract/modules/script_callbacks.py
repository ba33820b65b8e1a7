"""modules/script_callbacks.py: ``on_before_ui(callback)`` (l.588), ``on_infotext_pasted(callback)`` (l.572), called
with ``(infotext, params)`` by ``infotext_pasted_callback`` (l.378) before the paste fields are read;
``on_cfg_denoiser(callback)`` (l.523), called by ``cfg_denoiser_callback(params)`` (l.330) with ``CFGDenoiserParams``
(l.45) once per call of the CFG denoiser, after it has built the UNet's inputs."""

before_ui_callbacks = []
infotext_pasted_callbacks = []
cfg_denoiser_callbacks = []


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def on_before_ui(callback):
    before_ui_callbacks.append(callback)


def on_infotext_pasted(callback):
    infotext_pasted_callbacks.append(callback)


def on_cfg_denoiser(callback, *, name=None):
    cfg_denoiser_callbacks.append(callback)


def cfg_denoiser_callback(params):
    for callback in cfg_denoiser_callbacks:
        callback(params)
