"""modules/extra_networks.py: ``ExtraNetworkParams(items)`` (l.58) and ``parse_prompt`` (l.180): ``<name:a:b>``
tags leave the prompt and become ``{name: [ExtraNetworkParams(items=["a", "b"])]}``."""

import re

_TAG = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = [x for x in self.items if "=" not in x]
        self.named = dict(x.split("=", 1) for x in self.items if "=" in x)


def parse_prompt(prompt):
    res = {}

    def found(match):
        res.setdefault(match.group(1), []).append(ExtraNetworkParams(items=match.group(2).split(":")))
        return ""

    return _TAG.sub(found, prompt), res


def parse_prompts(prompts):
    res, data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        data = data or parsed
        res.append(updated)
    return res, data or {}
