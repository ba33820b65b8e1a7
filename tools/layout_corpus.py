"""The prompts ``tools/record_layouts.py`` lays out on a real WebUI: what AlignIT's layout must agree with.

Each case is a prompt as a user writes it, with the concepts whose triggers AlignIT replaces by class words (none:
the prompt is laid out as it is). Token counts below are the real CLIP vocabulary's: every word of ``WORDS`` is one
token, as is ``,``; the embeddings (``EMBEDDINGS``, test files the tool writes into the WebUI) are named after
words, so a prompt that uses the word gets the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import cycle, islice

WORDS = ("red", "blue", "green", "tree", "house", "sky", "bird", "car", "boat", "moon", "sun", "star", "fish")
EMBEDDINGS = {"crimson": 1, "crimson tide": 3, "tapestry": 8, "fresco": 16}  # name → vectors ("alignit_test_sks": 2)

SKS = ("<sks>", "cat")
OHWX = ("ohwx", "man")
DOG = ("<dog>", "golden retriever")  # a class word of two tokens
FLOWER = ("<flower>", "rhododendron")  # one word of four tokens
PAINT = ("<paint>", "tapestry")  # a class word that is an embedding's name (8 vectors)

DEFAULT = (("Original", 20),)
EMPHASIS = (("Original", 20), ("No norm", 20), ("None", 20))
BACKTRACK = (("Original", 20), ("Original", 6), ("Original", 0))  # A1111 reads the setting; Forge fixes it at 20


@dataclass(frozen=True)
class Case:
    id: str
    prompt: str
    concepts: tuple[tuple[str, str], ...] = ()
    settings: tuple[tuple[str, int], ...] = DEFAULT
    tags: tuple[str, ...] = field(default=())


def words(count: int, start: int = 0) -> str:
    """``count`` one-token words."""
    return " ".join(islice(cycle(WORDS), start, start + count))


def _comma_cases() -> list[Case]:
    cases = []
    # The comma sits ``distance`` tokens before the end of a full chunk; the next token overflows it.
    for distance in (1, 2, 5, 6, 7, 19, 20, 21, 22, 40, 74):
        text = f"{words(75 - distance)}, {words(distance - 1, 3)} {words(3, 7)}"
        cases.append(Case(f"comma-distance-{distance}", text, settings=BACKTRACK, tags=("comma",)))
    for distance in (19, 20, 21):
        text = f"{words(75 - distance)}, {words(distance - 2, 3)} <sks> {words(4, 7)}"
        cases.append(Case(f"comma-distance-{distance}-class-word-moves", text, (SKS,), BACKTRACK, ("comma", "trigger")))
        text = f"{words(75 - distance)}, {words(distance - 1, 3)} <dog> {words(2, 7)}"
        cases.append(Case(f"comma-distance-{distance}-class-word-overflows", text, (DOG,), BACKTRACK, ("comma", "trigger")))
        text = f"{words(75 - distance)}, {words(distance - 3, 3)} crimson {words(4, 7)}"
        cases.append(Case(f"comma-distance-{distance}-embedding-moves", text, settings=BACKTRACK, tags=("comma", "embedding")))
        text = f"({words(70 - distance)}:1.2) {words(5, 2)}, ({words(distance - 1, 3)}) [{words(3, 7)}]"
        cases.append(Case(f"comma-distance-{distance}-emphasis", text, settings=BACKTRACK, tags=("comma", "emphasis")))
        text = f"{words(75)} {words(75 - distance, 1)}, {words(distance - 1, 3)} {words(3, 7)}"
        cases.append(Case(f"comma-distance-{distance}-second-chunk", text, settings=BACKTRACK, tags=("comma", "three-chunk")))
    cases += [
        Case("comma-as-76th-token", f"{words(75)}, {words(10, 2)}", settings=BACKTRACK, tags=("comma",)),
        Case("comma-as-75th-token", f"{words(74)}, {words(10, 2)}", settings=BACKTRACK, tags=("comma",)),
        Case("comma-after-76th-token", f"{words(75)} sun, {words(60, 2)}, {words(20, 3)}", settings=BACKTRACK, tags=("comma",)),
        Case("two-commas", f"{words(50)}, {words(9, 1)}, {words(14, 2)} {words(3, 5)}", settings=BACKTRACK, tags=("comma",)),
        Case("comma-runs", f"{words(60)},,, {words(11, 1)} {words(5, 2)}", settings=BACKTRACK, tags=("comma",)),
        Case(
            "comma-then-break", f"{words(60)}, {words(10, 1)} BREAK {words(10, 2)}", settings=BACKTRACK, tags=("comma", "break")
        ),
        Case("comma-in-last-chunk-only", f"{words(30)}, {words(30, 1)}", settings=BACKTRACK, tags=("comma",)),
        Case(
            "comma-separated-tags", ", ".join(words(2, i) for i in range(40)), settings=BACKTRACK, tags=("comma", "three-chunk")
        ),
        Case(
            "comma-distance-20-embedding-straddles",
            f"{words(55)}, {words(15, 3)} tapestry {words(3, 7)}",
            settings=BACKTRACK,
            tags=("comma", "embedding"),
        ),
    ]
    return cases


def _break_cases() -> list[Case]:
    items = [
        ("break-middle", "a photo BREAK of a cat", ()),
        ("break-start", "BREAK a photo of a cat", ()),
        ("break-end", "a photo of a cat BREAK", ()),
        ("break-alone", "BREAK", ()),
        ("break-twice", "a photo BREAK BREAK of a cat", ()),
        ("break-glued", "aBREAKb and BREAKfast", ()),
        ("break-lowercase", "a photo break of a cat", ()),
        ("break-newlines", "a photo\nBREAK\nof a cat", ()),
        ("break-in-emphasis", "(a photo BREAK of a cat:1.2)", ()),
        ("break-in-brackets", "[a photo BREAK of] a cat", ()),
        ("break-at-full-chunk", f"{words(75)} BREAK {words(5)}", ()),
        ("break-after-full-chunk-end", f"{words(75)} BREAK", ()),
        ("break-then-long", f"{words(10)} BREAK {words(80)}", ()),
        ("break-trigger", "a photo BREAK <sks> playing badminton", (SKS,)),
        ("break-trigger-weighted", "a photo BREAK (<sks>:1.5) of", (SKS,)),
        ("break-before-trigger-glued", "a photo BREAK<sks> playing", (SKS,)),
        ("break-embedding", "crimson BREAK tapestry BREAK fresco", ()),
    ]
    return [Case(i, p, c, EMPHASIS if "emphasis" in i or "brackets" in i else DEFAULT, ("break",)) for i, p, c in items]


def _emphasis_cases() -> list[Case]:
    items = [
        ("emphasis-round", "a (cat) on a sofa"),
        ("emphasis-nested", "a (((cat))) on a ((sofa))"),
        ("emphasis-square", "a [cat] on a [[sofa]]"),
        ("emphasis-weight", "a (cat:1.3) on a (sofa:0.5)"),
        ("emphasis-weight-spaces", "a (cat : 1.3 ) on a (sofa:  .5)"),
        ("emphasis-weight-negative", "a (cat:-1) on a (sofa:+2)"),
        ("emphasis-weight-nested", "a ((cat:1.3) on a [sofa]:1.2)"),
        ("emphasis-mixed", "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)"),
        ("emphasis-escaped", r"a \(cat\) on a \[sofa\] with \\ and \ slash"),
        ("emphasis-escaped-in-group", r"(a \(cat\):1.2) and [\]]"),
        ("emphasis-unbalanced-open", "a (cat on a [sofa"),
        ("emphasis-unbalanced-close", "a cat) on a sofa] done"),
        ("emphasis-colon-text", "a cat: a sofa: 3 (x:) (y: z)"),
        ("emphasis-empty-groups", "a () cat [] (:1.5)"),
        ("emphasis-adjacent", "(cat)(dog)[bird][fish]"),
        ("emphasis-long", f"({words(40)}:1.1) [{words(40, 3)}] {words(10, 5)}"),
        ("emphasis-across-chunk", f"{words(70)} ({words(10, 2)}:1.4) {words(5, 4)}"),
        ("emphasis-tokens-with-brackets", "a cat (( )) ((((( sofa"),
    ]
    return [Case(i, p, settings=EMPHASIS, tags=("emphasis",)) for i, p in items]


def _embedding_cases() -> list[Case]:
    items = [
        ("embedding-one-vector", "a crimson house", ()),
        ("embedding-several-vectors", "a tapestry of a house", ()),
        ("embedding-longest-name-first", "the crimson tide rolls", ()),
        ("embedding-name-prefix-only", "the crimson tides roll", ()),
        ("embedding-glued-word", "crimsontide and tapestrys", ()),
        ("embedding-uppercase", "CRIMSON Tapestry", ()),
        ("embedding-repeated", "crimson crimson tapestry tapestry fresco", ()),
        ("embedding-multi-token-name", "alignit_test_sks in a garden", ()),
        ("embedding-emphasised", "a (crimson:1.3) house, [tapestry], ((fresco))", ()),
        ("embedding-emphasised-nested", "((a crimson tide:1.2) and tapestry)", ()),
        ("embedding-in-brackets-text", "[crimson|tapestry]", ()),
        ("embedding-fits-exactly", f"{words(67)} tapestry {words(3)}", ()),
        ("embedding-one-over", f"{words(68)} tapestry {words(3)}", ()),
        ("embedding-crosses-boundary", f"{words(70)} tapestry {words(3)}", ()),
        ("embedding-16-crosses-boundary", f"{words(60)} fresco {words(3)}", ()),
        ("embedding-at-token-75", f"{words(74)} crimson {words(3)}", ()),
        ("embedding-at-token-76", f"{words(75)} crimson {words(3)}", ()),
        ("embedding-emphasised-crosses-boundary", f"{words(70)} (tapestry:1.4) {words(3)}", ()),
        ("embedding-three-chunks", f"{words(70)} fresco {words(60)} tapestry {words(20)}", ()),
        ("embedding-and-trigger", "alignit_test_sks and <sks> in the snow", (SKS,)),
        ("embedding-class-word", "a <paint> on a wall", (PAINT,)),
        ("embedding-class-word-emphasised", "a (<paint>:1.2) and a crimson wall", (PAINT,)),
        ("embedding-class-word-at-boundary", f"{words(70)} <paint> {words(3)}", (PAINT,)),
    ]
    return [Case(i, p, c, EMPHASIS if "emphasised" in i else DEFAULT, ("embedding",)) for i, p, c in items]


def _trigger_cases() -> list[Case]:
    items = [
        ("trigger-simple", "a photo of <sks> playing badminton", (SKS,)),
        ("trigger-word", "a photo of ohwx playing badminton", (OHWX,)),
        ("trigger-case", "a photo of OHWX and Ohwx", (OHWX,)),
        ("trigger-glued", "my<sks>'s toy and ohwxs", (SKS, OHWX)),
        ("trigger-two-concepts", "<sks> and ohwx in a garden", (SKS, OHWX)),
        ("trigger-repeated", "<sks>, <sks> and <sks>", (SKS,)),
        ("trigger-multi-token-class", "a <dog> in a field", (DOG,)),
        ("trigger-long-class-word", "a <flower> in a vase", (FLOWER,)),
        ("trigger-emphasised", "a (<sks>:1.3) playing [badminton], ((sharp focus))", (SKS,)),
        ("trigger-nested-emphasis", "a ((<dog>)) and [[<flower>]]", (DOG, FLOWER)),
        ("trigger-class-fits-chunk", f"{words(73)} <dog>", (DOG,)),
        ("trigger-class-split", f"{words(74)} <dog>", (DOG,)),
        ("trigger-class-split-more", f"{words(74)} <dog> {words(5)}", (DOG,)),
        ("trigger-word-class-split", f"{words(73)} <flower> {words(3)}", (FLOWER,)),
        ("trigger-word-class-split-late", f"{words(72)} <flower> {words(3)}", (FLOWER,)),
        ("trigger-at-token-75", f"{words(74)} <sks> {words(3)}", (SKS,)),
        ("trigger-at-token-76", f"{words(75)} <sks> {words(3)}", (SKS,)),
        ("trigger-emphasised-split", f"{words(74)} (<dog>:1.3) {words(3)}", (DOG,)),
        ("trigger-three-chunks", f"<sks> {words(80)} <dog> {words(70)} ohwx", (SKS, DOG, OHWX)),
        ("trigger-three-chunks-splits", f"{words(74)} <dog> {words(73)} <dog> {words(5)}", (DOG,)),
        (
            "trigger-long-tagged",
            "my<sks>'s toy, " + ", ".join(["a detailed painting of a garden with flowers"] * 9) + ", <sks>",
            (SKS,),
        ),
        ("trigger-with-embeddings", "a crimson <sks> on a tapestry", (SKS,)),
        ("trigger-after-embedding-boundary", f"{words(66)} tapestry <sks> {words(2)}", (SKS,)),
        ("trigger-escaped-brackets", r"a \(<sks>\) toy", (SKS,)),
        ("trigger-none-emphasis", "a (<sks>:1.5) toy", (SKS,)),
    ]
    return [
        Case(
            i,
            p,
            c,
            EMPHASIS if ("emphas" in i or "escaped" in i) else DEFAULT,
            ("trigger",) + (("three-chunk",) if "three" in i else ()),
        )
        for i, p, c in items
    ]


def _three_chunk_cases() -> list[Case]:
    return [
        Case("three-chunks-plain", words(200), tags=("three-chunk",)),
        Case("three-chunks-exact", words(150), tags=("three-chunk",)),
        Case("three-chunks-one-more", words(151), tags=("three-chunk",)),
        Case("four-chunks-breaks", f"{words(10)} BREAK {words(75)} BREAK {words(76)}", tags=("three-chunk", "break")),
        Case(
            "three-chunks-emphasis", f"({words(100)}:1.2) [{words(100, 4)}]", settings=EMPHASIS, tags=("three-chunk", "emphasis")
        ),
    ]


def _editing_cases() -> list[Case]:
    items = [
        ("edit-replace", "a [dog:<sks>:0.5] in a garden", (SKS,)),
        ("edit-add", "a [<sks>:0.25] in a garden", (SKS,)),
        ("edit-remove", "a [<sks>::3] in a garden", (SKS,)),
        ("edit-steps", "a [cat:dog:5] and [bird:fish:15]", ()),
        ("edit-nested", "a [[cat:dog:0.3]:<sks>:0.6] here", (SKS,)),
        ("edit-emphasis", "a [(<sks>:1.3):dog:0.5] here", (SKS,)),
        ("edit-alternate", "a [<sks>|dog] on a sofa", (SKS,)),
        ("edit-alternate-three", "a [cat|dog|<dog>] on a sofa", (DOG,)),
        ("edit-alternate-nested", "a [[cat|dog]:bird:0.5]", ()),
        ("edit-break", "a [photo BREAK:painting:0.5] of <sks>", (SKS,)),
        ("edit-long", f"[{words(80)}:{words(30)}:0.5] <dog>", (DOG,)),
        ("edit-embedding", "a [crimson:tapestry:0.5] wall", ()),
        ("edit-escaped", r"a \[cat:dog:0.5\] here", ()),
        ("edit-not-a-schedule", "a [cat:dog] and [cat:dog:x]", ()),
    ]
    return [Case(i, p, c, tags=("editing",)) for i, p, c in items]


def _and_cases() -> list[Case]:
    items = [
        ("and-two", "a <sks> AND a garden", (SKS,)),
        ("and-weighted", "a <sks> AND a garden :0.7", (SKS,)),
        ("and-weights-all", "a cat :1.2 AND a dog :-0.5 AND a bird:0", ()),
        ("and-lowercase", "a cat and a dog", ()),
        ("and-glued", "a catAND dog ANDROID", ()),
        ("and-emphasis", "(a <sks>:1.2) AND [a garden] :1.5", (SKS,)),
        ("and-break", "a photo BREAK <sks> AND a garden BREAK sky", (SKS,)),
        ("and-editing", "a [cat:<sks>:0.5] AND a [dog|bird]", (SKS,)),
        ("and-long", f"{words(80)} <dog> AND {words(76, 3)}", (DOG,)),
        ("and-empty-part", "a cat AND  AND a dog", ()),
    ]
    return [Case(i, p, c, tags=("and",)) for i, p, c in items]


def _unicode_cases() -> list[Case]:
    items = [
        ("unicode-accents", "a café with crème brûlée, naïve style", ()),
        ("unicode-cjk", "東京の猫 <sks> 写真", (SKS,)),
        ("unicode-emoji", "a 🐱 and a 🐶 playing 🏸", ()),
        ("unicode-cyrillic-greek", "Москва at night, αβγ", ()),
        ("unicode-quotes", "a “quoted” ‘word’", ()),
        ("unicode-ligature-fullwidth", "ﬁsh and ｆｕｌｌ width", ()),
        ("unicode-nbsp-tabs", "a\u00a0cat\tand\na dog", ()),
        ("unicode-html-entity", "salt &amp; pepper", ()),
        ("unicode-html-entity-twice", "salt &amp;amp; pepper &amp;lt;3", ()),  # OpenCLIP's tokenizer unescapes twice
        ("unicode-combining", "cafe\u0301 and nai\u0308ve", ()),
        ("unicode-emphasis", "(東京:1.2) [🐱] crimson", ()),
        ("unicode-long", "🐱 " * 80, ()),
    ]
    return [Case(i, p, c, tags=("unicode",)) for i, p, c in items]


def _blank_cases() -> list[Case]:
    items = [
        ("empty", ""),
        ("space", " "),
        ("spaces", "     "),
        ("newline", "\n"),
        ("whitespace-mixed", " \t \n "),
        ("only-comma", ","),
        ("only-brackets", "()[]"),
        ("only-escapes", r"\(\)"),
        ("single-word", "cat"),
        ("exactly-75", words(75)),
        ("exactly-76", words(76)),
    ]
    return [Case(i, p, settings=EMPHASIS if "bracket" in i or "escape" in i else DEFAULT, tags=("blank",)) for i, p in items]


CASES: list[Case] = [
    *_comma_cases(),
    *_break_cases(),
    *_emphasis_cases(),
    *_embedding_cases(),
    *_trigger_cases(),
    *_three_chunk_cases(),
    *_editing_cases(),
    *_and_cases(),
    *_unicode_cases(),
    *_blank_cases(),
]
