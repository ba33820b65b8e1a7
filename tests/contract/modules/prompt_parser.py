"""modules/prompt_parser.py: schedules (l.27), ``SdConditioning`` (l.141), ``get_learned_conditioning`` (l.159),
``get_multicond_prompt_list`` (l.211), ``ComposableScheduledPromptConditioning`` / ``MulticondLearnedConditioning``
(l.241-252), ``get_multicond_learned_conditioning`` (l.255), ``reconstruct_cond_batch`` (l.280),
``reconstruct_multicond_batch`` (l.321), ``parse_prompt_attention`` (l.353-459).

Prompt editing is covered for ``[a:b:when]``, ``[a:when]`` and ``[:b:when]`` without nesting or alternation; the
real lark grammar is exercised by tests/test_a1111_integration.py."""

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])

_EDIT = re.compile(r"\[([^\[\]:]*?)(?::([^\[\]:]*?))?:\s*([0-9.]+)\s*\]")
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
# l.353-366: escapes (a lone backslash too), brackets, a weight closing a round group, runs of text, a lone colon
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)  # l.368


def parse_prompt_attention(text):
    """l.370-459: ``[[text, weight], ...]``; ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:w)`` ×w, unclosed groups applied at the
    end, ``BREAK`` as ``["BREAK", -1]``, runs of equal weight merged."""
    res, round_open, square_open = [], [], []

    def multiply(start, factor):
        for item in res[start:]:
            item[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    res = res or [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    steps = base_steps if hires_steps is None else hires_steps

    def when(match):
        text = match.group(3)
        value = float(text) * steps if "." in text else float(text)
        return min(steps, int(value))

    def at(prompt, step):
        def pick(match):
            before, after = (match.group(1), match.group(2)) if match.group(2) is not None else ("", match.group(1))
            return before if step <= when(match) else after

        return _EDIT.sub(pick, prompt)

    def schedule(prompt):
        ends = sorted({steps} | {when(m) for m in _EDIT.finditer(prompt) if when(m) >= 1})
        return [[end, at(prompt, end)] for end in ends]

    return [schedule(prompt) for prompt in prompts]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res, cache = [], {}
    for prompt, schedule in zip(
        prompts, get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    ):
        if prompt not in cache:
            texts = SdConditioning([text for _, text in schedule], copy_from=prompts)
            conds = model.get_learned_conditioning(texts)
            cache[prompt] = [
                ScheduledPromptConditioning(end, {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i])
                for i, (end, _) in enumerate(schedule)
            ]
        res.append(cache[prompt])
    return res


def get_multicond_prompt_list(prompts):
    res_indexes, prompt_indexes = [], {}
    flat = SdConditioning(prompts)
    flat.clear()
    for prompt in prompts:
        indexes = []
        for subprompt in _AND.split(prompt):
            text, weight = _WEIGHT.search(subprompt).groups()
            if text not in prompt_indexes:
                prompt_indexes[text] = len(flat)
                flat.append(text)
            indexes.append((prompt_indexes[text], 1.0 if weight is None else float(weight)))
        res_indexes.append(indexes)
    return res_indexes, flat, prompt_indexes


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def reconstruct_cond_batch(c, current_step):
    entries = [next((entry for entry in schedule if current_step <= entry.end_at_step), schedule[0]) for schedule in c]
    if isinstance(entries[0].cond, dict):
        return {key: torch.stack([entry.cond[key] for entry in entries]) for key in entries[0].cond}
    return torch.stack([entry.cond for entry in entries])


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for parts in c.batch:
        entries = []
        for part in parts:
            target = next((i for i, entry in enumerate(part.schedules) if current_step <= entry.end_at_step), 0)
            entries.append((len(tensors), part.weight))
            tensors.append(part.schedules[target].cond)
        conds_list.append(entries)
    if isinstance(tensors[0], dict):
        return conds_list, {key: _stack([t[key] for t in tensors]) for key in tensors[0]}
    return conds_list, _stack(tensors)


def _stack(tensors):
    """stack_conds (l.307): shorter conds repeat their last row."""
    if tensors[0].dim() == 1:
        return torch.stack(tensors)
    length = max(t.shape[0] for t in tensors)
    return torch.stack([torch.vstack([t, t[-1:].repeat(length - t.shape[0], 1)]) for t in tensors])
