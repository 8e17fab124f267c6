"""NameColumn: names in one buffer behave as the list of them."""

from __future__ import annotations

import random

import pytest

from converter.readers.name_column import NameColumn

_PIECES = ["", "a", "ab", "b", "ba", "é", "x.y", "\ud800", "日本", "😀", "\x00"]


@pytest.mark.parametrize("seed", range(5))
def test_a_name_column_is_the_list_of_its_names(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        names = [rng.choice(_PIECES) + rng.choice(_PIECES) for _ in range(rng.randint(0, 7))]
        column = NameColumn(names)
        assert list(column) == names and len(column) == len(names)
        assert [column[i] for i in range(-len(names), len(names))] == names + names
        assert column[1:4] == names[1:4] and column[::-1] == names[::-1]
        assert [e.decode("utf-8", "surrogatepass") for e in column.encoded()] == names
        assert list(column.in_order(range(1, len(names)))) == names[1:]
        assert list(column.in_order([len(names) - 1 - i for i in range(len(names))])) == names[::-1]
        for probe in [a + b for a in _PIECES for b in _PIECES[:4]]:
            assert (probe in column) == (probe in names), (names, probe)
        assert column.has_lone_surrogates() == any("\ud800" in n for n in names)
        extended = NameColumn()
        encoded = [n.encode("utf-8", "surrogatepass") for n in names]
        cut = rng.randint(0, len(encoded))
        extended.extend_encoded(encoded[:cut])
        extended.extend_encoded(encoded[cut:])
        assert list(extended) == names and [extended[i] for i in range(len(names))] == names
        with pytest.raises(IndexError):
            column[len(names)]


def test_names_decoded_a_chunk_at_a_time_are_the_names() -> None:
    rng = random.Random(7)
    names = [f"model.layers.{i}.w" if i % 97 else rng.choice(_PIECES) * 3 for i in range(10_000)]
    for with_nul in (False, True):  # a NUL in a name: cut one by one instead of split
        if with_nul:
            names[5000] = "a\x00b"
        column = NameColumn(names)
        assert list(column) == names
        assert list(column.in_order(range(4000, 9000))) == names[4000:9000]
        assert column[4090:4100] == names[4090:4100]
