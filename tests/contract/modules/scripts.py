"""modules/scripts.py: ``AlwaysVisible`` (l.14), ``Script`` (l.52), ``scripts_data`` (ScriptClassData list, l.381)."""

AlwaysVisible = object()
scripts_data = []


class Script:
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True
