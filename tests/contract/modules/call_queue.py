"""modules/call_queue.py: ``queue_lock`` (l.8, a FIFOLock in both WebUIs), held by every generation (the UI's
``wrap_gradio_gpu_call`` l.32, the API's txt2img/img2img) so that no two jobs use the model at once."""

import threading

queue_lock = threading.Lock()
