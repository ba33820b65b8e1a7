"""The host-free parts of the attention maps: which words, where their rows are, the recorder's sums against a direct
computation, and the pictures."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alignit import map_pictures
from alignit.attention_maps import (
    CallColumns,
    CondEntry,
    MapRecorder,
    Word,
    columns,
    default_words,
    layer_grid,
    mark_words,
    normalised,
    parse_words,
    row_words,
    spliced_row_words,
)
from alignit.concepts import Concept
from alignit.layout import Span, layout_prompt
from alignit.splice import splice_order

CONCEPTS = (Concept("<sks>", "cat"), Concept("ohwx", "man"))


def test_default_words_are_the_concepts_then_the_content_words():
    prompt = "a photo of <sks> playing badminton with ohwx, (sharp:1.2) focus BREAK in a Garden garden * <lora:x:1> AND cat"
    words = default_words(prompt, CONCEPTS, "*")
    named = [Word("cat", 0), Word("man", 1)]
    assert words == named + [Word(w) for w in ("photo", "playing", "badminton", "sharp", "focus", "Garden")]
    assert default_words(prompt, CONCEPTS, "*", limit=20) == words  # no "garden" again, no tag, placeholder, AND or cat
    assert default_words(prompt, CONCEPTS, "*", limit=3) == [*named, Word("photo")]
    assert default_words("a garden", CONCEPTS, "*") == [Word("garden")]  # no concept named: its word is not there


def test_words_the_user_names():
    words = parse_words(" racket , <SKS>,man,, tennis  court, racket", CONCEPTS)
    assert words == [Word("racket"), Word("cat", 0), Word("man", 1), Word("tennis court")]
    assert parse_words(",".join(f"w{i}" for i in range(12)), CONCEPTS)[-1] == Word("w7")
    assert Word("cat", 0).caption(CONCEPTS, {0}) == "cat" and Word("cat", 0).caption(CONCEPTS, set()) == "<sks>"


def test_marked_words_lie_where_the_webui_puts_their_tokens(encoder):
    prompt = "a photo of <sks> and ohwx playing badminton in a garden"
    words = [Word("cat", 0), Word("badminton"), Word("garden"), Word("tennis")]
    aligned = mark_words(prompt, CONCEPTS, words, applied={0, 1})
    assert aligned.plain == "a photo of cat and man playing badminton in a garden"
    assert mark_words(prompt, CONCEPTS, words, applied=set()).plain == prompt
    chunks = layout_prompt(aligned.marked, encoder)
    assert chunks[0].tokens == layout_prompt(aligned.plain, encoder)[0].tokens
    rows = row_words(chunks, len(words))
    # BOS a photo of cat and man playing badminton in a garden: "man" is a concept no word names
    assert rows[:13] == [None, None, None, None, 0, None, None, None, 1, None, None, 2, None]
    assert 3 not in rows


def test_rows_follow_the_splice(encoder):
    (chunk,) = layout_prompt("a \ue000\ue100cat\ue001 on grass", encoder)
    words = [None, None, 0, None, 1] + [None] * 72
    span = Span(0, 0, 2, 1)
    origins, dropped = splice_order(chunk, {span: 3})  # three concept rows where the class word had one
    assert dropped == 0
    assert spliced_row_words(words, [origins])[:7] == [None, None, 0, 0, 0, None, 1]
    table = columns(spliced_row_words(words, [origins]), 2)
    assert table.shape == (77, 2) and table[:, 0].tolist()[:6] == [0, 0, 1, 1, 1, 0] and table[6, 1] == 1


def test_layer_grids_round_up_as_the_unet_downsamples():
    assert layer_grid((64, 64), 2, 1024) == (32, 32)
    assert layer_grid((75, 64), 4, 19 * 16) == (19, 16)
    assert layer_grid((64, 64), 4, 1024) is None


def direct(q, k, heads, tokens, side, size):
    """softmax(q·kᵀ/√d) summed over heads and the token rows, upsampled: one layer's map, computed plainly."""
    dim = q.shape[-1] // heads
    qh, kh = q.view(-1, heads, dim).transpose(0, 1), k.view(-1, heads, dim).transpose(0, 1)
    probabilities = (qh @ kh.transpose(1, 2) / dim**0.5).softmax(-1).sum(0)
    small = probabilities[:, tokens].sum(-1).view(1, 1, side, side)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)[0, 0]


@pytest.mark.parametrize("slice_elements", [1 << 19, 40])
def test_recorder_sums_layers_and_counts_every_copy_of_the_conditioning(slice_elements):
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(77, 8, generator=generator)
    other = torch.randn(77, 8, generator=generator)
    recorder = MapRecorder([2, 1], slice_elements)
    words = [None] * 77
    words[3], words[4], words[5] = 0, 0, 1
    recorder.set_entries(
        [
            CondEntry(0, cond, columns(words, 2)),
            CondEntry(0, cond.clone(), columns(words, 2)),
            CondEntry(1, other, columns([None] * 6 + [0] + [None] * 70, 1)),
        ]
    )
    # batch: uncond, image 0 tiled twice, image 1 followed by padding that is not its conditioning
    context = torch.stack(
        [torch.zeros(154, 8), torch.cat([cond, cond]), torch.cat([other, torch.randn(77, 8, generator=generator)])]
    )
    call = recorder.match(context, [1, 2], [0, 1])
    assert call is not None and call.rows.tolist() == [1, 2]
    want = [torch.zeros(2, 8, 8), torch.zeros(1, 8, 8)]
    for side in (4, 2):
        q = torch.randn(3, side * side, 32, generator=generator)
        k = torch.randn(3, 154, 32, generator=generator)
        recorder.add(call, q, k, 4, (8, 8), (side, side))
        want[0][0] += direct(q[1], k[1], 4, [3, 4, 80, 81], side, (8, 8))
        want[0][1] += direct(q[1], k[1], 4, [5, 82], side, (8, 8))
        want[1][0] += direct(q[2], k[2], 4, [6], side, (8, 8))
    got = recorder.maps()
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert recorder.largest_slice <= max(slice_elements, 2 * 4 * 154)


def test_maps_of_two_latent_sizes_meet_at_the_larger():
    recorder = MapRecorder([1])
    call = CallColumns(torch.tensor([0]), torch.ones(1, 3, 1))
    q, k = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    recorder.add(call, q, k, 2, (4, 4), (2, 2))
    recorder.add(call, torch.randn(1, 16, 8), k, 2, (8, 8), (4, 4))
    (maps,) = recorder.maps()
    assert maps.shape == (1, 8, 8)
    # every query's probabilities sum to 1: 2 heads, 2 layers
    torch.testing.assert_close(maps, torch.full((1, 8, 8), 4.0))


def test_nothing_recorded_gives_empty_maps_and_unknown_images_are_ignored():
    recorder = MapRecorder([0, 2])
    assert recorder.match(torch.zeros(1, 77, 8), [0], [0]) is None
    assert recorder.match(torch.zeros(1, 77, 8), [0], [5]) is None
    assert [m.shape for m in recorder.maps()] == [(0, 0, 0), (2, 0, 0)]


def test_normalised_per_word_or_on_a_shared_scale():
    maps = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]], [[4.0, 0.0]]])
    assert normalised(maps).tolist() == [[[0.0, 1.0]], [[0.0, 0.0]], [[1.0, 0.0]]]
    low, high = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([4.0, 4.0, 8.0])
    assert normalised(maps, low, high).tolist() == [[[0.25, 0.75]], [[0.5, 0.5]], [[0.5, 0.0]]]


def test_pictures():
    image = Image.new("RGB", (64, 48), (255, 255, 255))
    heat = torch.tensor([[0.0, 1.0]])
    over = map_pictures.overlay(image, heat)
    assert over.size == (64, 48)
    left, right = over.getpixel((0, 24)), over.getpixel((63, 24))
    assert left == (128, 128, 191) and right == (191, 128, 128)  # jet's dark blue and dark red, half opaque over white
    assert map_pictures.jet(torch.tensor([0.5])).tolist() == [[0.5, 1.0, 0.5]]
    pictures = map_pictures.word_pictures(image, torch.zeros(2, 3, 3), ["cat", "a caption far too long for the picture's width"])
    assert len(pictures) == 2 and pictures[0].size == pictures[1].size  # shown at least 256 wide, the long caption shrunk
    assert pictures[0].width == 256 and pictures[0].height > 192
    grid = map_pictures.grid([pictures, pictures], ("AlignIT", "without AlignIT"))
    title = map_pictures.band("AlignIT", 256)
    assert grid.size == (2 * 256 + 4, title.height + 2 * pictures[0].height + 2 * 4)
    back = map_pictures.image_from_tensor(torch.full((3, 2, 2), 0.5))
    assert back.size == (2, 2) and back.getpixel((0, 0)) == (128, 128, 128)
