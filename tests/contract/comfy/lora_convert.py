"""comfy/lora_convert.py ``convert_lora`` (l.35-43): Flux/Wan/USO key conversions; SD LoRAs come back as they are."""


def convert_lora(sd):
    return sd
