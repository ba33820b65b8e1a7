"""backend/text_processing/parsing.py:23 ``parse_prompt_attention(text, emphasis)``: A1111's parser
(modules/prompt_parser.py:370, the same code), except that emphasis "None" takes the text literally (l.35-37)."""

from modules.prompt_parser import parse_prompt_attention as _a1111_parse


def parse_prompt_attention(text, emphasis):
    return [[text, 1.0]] if emphasis == "None" else _a1111_parse(text)
