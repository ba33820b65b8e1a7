"""The keys and values a WebUI flow computes with AlignIT on, held against the same batch with AlignIT off and the
class word in the prompt, by the definition: at strength s only the concept's rows differ, and there they are
``lerp(W·c_class, (W + ΔW)·c', s)``; every other row of every batch item (another prompt, an AND part, the negative
prompt), in every pass, is bit for bit the plain one."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Call = tuple[tuple[str, str], torch.Tensor, torch.Tensor]  # ((layer, proj), context, output) of one projection call

# The concept's prompt and a second one that shares every word before the class word: a batch of two prompts, an
# AND part without the concept, and a negative prompt with the same prefix.
PROMPTS = ["a photo of ohwx playing AND a photo of man", "a photo of man playing"]
PLAIN = ["a photo of man playing AND a photo of man", "a photo of man playing"]
NEGATIVE = "a photo of man"
CONCEPT_TOKEN = 4  # BOS a photo of ohwx: "ohwx" and "man" are one token each


def concept_row(full: list[Call], off: list[Call]) -> torch.Tensor:
    """c': the row where a run at strength 1 differs from the plain run (the same in every layer's context)."""
    (_, context, _), (_, plain_context, _) = full[0], off[0]
    return context[(context != plain_context).any(-1)]


def check_against_plain(
    on: list[Call],
    off: list[Call],
    strength: float,
    c_prime: torch.Tensor,
    weight: Callable[[tuple[str, str]], torch.Tensor],
    delta: Callable[[tuple[str, str], torch.Tensor], torch.Tensor],
) -> None:
    assert len(on) == len(off) and on, "both runs make the same projection calls"
    for (key, context, out), (plain_key, plain_context, plain_out) in zip(on, off):
        assert key == plain_key
        differs = (context != plain_context).any(-1)
        if strength == 0:
            assert not differs.any() and torch.equal(out, plain_out), key
            continue
        where = differs.nonzero().tolist()
        assert len(where) == 1 and where[0][1] == CONCEPT_TOKEN, (key, where)
        assert torch.equal(out[~differs], plain_out[~differs]), key
        c_class = plain_context[differs]
        w = weight(key)
        want = torch.lerp(F.linear(c_class, w), F.linear(c_prime, w) + delta(key, c_prime), strength)
        torch.testing.assert_close(out[differs], want, rtol=1e-5, atol=1e-5)
