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


model_loaded_callbacks = []
app_started_callbacks = []


def on_model_loaded(callback, *, name=None):
    """l.467; ``model_loaded_callback(sd_model)`` (l.270) runs them after a checkpoint loads (sd_models.py 864; Forge
    518), after the embeddings are reloaded (A1111 sd_models.py 860)."""
    model_loaded_callbacks.append(callback)


def model_loaded_callback(sd_model):
    for callback in model_loaded_callbacks:
        callback(sd_model)


def on_app_started(callback, *, name=None):
    """l.456; ``app_started_callback(demo, app)`` (l.253) runs them with the FastAPI app once it is built (webui.py
    119, or 38 with ``--nowebui`` and ``demo`` None)."""
    app_started_callbacks.append(callback)


def app_started_callback(demo, app):
    for callback in app_started_callbacks:
        callback(demo, app)


def on_infotext_pasted(callback):
    infotext_pasted_callbacks.append(callback)


def on_cfg_denoiser(callback, *, name=None):
    cfg_denoiser_callbacks.append(callback)


def cfg_denoiser_callback(params):
    for callback in cfg_denoiser_callbacks:
        callback(params)
