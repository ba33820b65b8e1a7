"""modules/paths.py: ``models_path`` (paths_internal.py: ``<data dir>/models``); tests point it at a tmp folder."""

models_path = "models"
