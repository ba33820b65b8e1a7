from alignit.concepts import Concept
from alignit.prompt import MARK_OPEN, rewrite_prompt, split_marked, strip_markers

SKS = Concept("<sks>", "cat")
DOG = Concept("mydog", "dog")


def test_plain_and_marked_agree():
    rewrite = rewrite_prompt("a <sks> playing badminton", [SKS])
    assert rewrite.plain == "a cat playing badminton"
    assert strip_markers(rewrite.marked) == rewrite.plain
    assert split_marked(rewrite.marked) == [("a ", None), ("cat", 0), (" playing badminton", None)]
    assert rewrite.found == (1,)


def test_triggers_inside_webui_syntax():
    prompt = "(<sks>:1.2), [<sks>:dog:0.5] AND [mydog|<sks>] BREAK <SKS> <lora:mydog:0.5> <hypernet:mydog:1>"
    rewrite = rewrite_prompt(prompt, [SKS, DOG])
    assert rewrite.plain == "(cat:1.2), [cat:dog:0.5] AND [dog|cat] BREAK cat <lora:mydog:0.5> <hypernet:mydog:1>"
    assert rewrite.found == (4, 1)
    assert [index for _, index in split_marked(rewrite.marked) if index is not None] == [0, 0, 1, 0, 0]


def test_whole_words_only_and_glued_triggers():
    rewrite = rewrite_prompt("mydogs and mydog, my<sks>'s toy", [SKS, DOG])
    assert rewrite.plain == "mydogs and dog, my cat's toy"
    assert rewrite.found == (1, 1)


def test_longest_trigger_wins_and_markers_in_input_are_neutralized():
    long = Concept("<sks> cat", "tabby cat")
    rewrite = rewrite_prompt(f"a <sks> cat and a <sks>{MARK_OPEN}", [SKS, long])
    assert rewrite.plain == "a tabby cat and a cat "
    assert rewrite.found == (1, 1)


def test_no_concepts_found():
    rewrite = rewrite_prompt("a dog", [SKS])
    assert not rewrite.has_concepts and rewrite.plain == rewrite.marked == "a dog"
