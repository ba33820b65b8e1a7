"""modules/shared.py: ``opts`` (options used by the glue, defaults from modules/shared_options.py) and ``sd_model``."""

from types import SimpleNamespace
from typing import Any

opts = SimpleNamespace(
    emphasis="Original",  # shared_options.py: "emphasis"
    comma_padding_backtrack=20,  # shared_options.py: "comma_padding_backtrack"
    use_old_emphasis_implementation=False,
    use_old_scheduling=False,
    CLIP_stop_at_last_layers=1,
)
sd_model: Any = None  # sd_models_types.WebuiSdModel once a checkpoint is loaded
state = SimpleNamespace(job_timestamp="0")  # shared_state.State.job_timestamp, new for every job
loaded_hypernetworks: list = []  # shared.loaded_hypernetworks
sd_unet = SimpleNamespace(current_unet=None)  # modules/sd_unet.py: a replacement UNet (TensorRT) when set
