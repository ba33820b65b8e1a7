import pytest

from alignit.schedule import active_steps, refine_schedule


def used_at(schedule, step):
    """A1111 reconstruct_cond_batch (prompt_parser.py:282): the first entry with step <= end_at_step, else entry 0."""
    return next((cond for end, cond in schedule if step <= end), schedule[0][1])


@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.0, 0.5), (0.25, 1.0), (0.2, 0.6), (0.5, 0.55)])
@pytest.mark.parametrize("schedule", [[(20, "A")], [(8, "A"), (20, "B")], [(3, "A"), (12, "B"), (20, "C")]])
def test_each_step_gets_the_right_conditioning(schedule, start, end):
    aligned = [name.lower() for _, name in schedule]
    refined = refine_schedule(schedule, aligned, start, end)
    first, last = active_steps(20, start, end)
    for step in range(20):
        plain = used_at(schedule, step)
        inside = start * 20 <= step < end * 20
        assert used_at(refined, step) == (plain.lower() if inside else plain), step
    assert refined[-1][0] == 20
    assert first == int(start * 20 + 0.9999)
    assert last is None if end == 1.0 else last == int(end * 20 + 0.9999) - 1


def test_full_range_is_the_aligned_schedule():
    assert refine_schedule([(5, "A"), (20, "B")], ["a", "b"], 0.0, 1.0) == [(5, "a"), (20, "b")]


def test_lengths_must_match():
    with pytest.raises(ValueError):
        refine_schedule([(20, "A")], [], 0.0, 1.0)
