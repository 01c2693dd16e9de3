"""Selectors are pure logic over units: tested on plain Unit records, no framework."""

from __future__ import annotations

import pytest

from xfer import Unit
from xfer import select as S


def _unit(path: str, kind: str, index: int) -> Unit:
    return Unit(path, kind, index, 0, None, None)


UNITS = [
    _unit("stem", "conv", 0),
    _unit("base", "container", 1),
    _unit("base.block1", "container", 1),
    _unit("base.block1.conv", "conv", 1),
    _unit("base.block1.preact_bn", "batchnorm", 1),
    _unit("base.drop", "dropout", 1),
    _unit("head", "container", 2),
    _unit("head.dense", "dense", 2),
    _unit("head.norm", "norm", 2),
]


def paths(selector):
    return [u.path for u in selector(UNITS)]


def test_path_double_star_includes_the_block_itself():
    assert paths(S.path("base.**")) == [
        "base",
        "base.block1",
        "base.block1.conv",
        "base.block1.preact_bn",
        "base.drop",
    ]
    assert paths(S.path("base.*")) == ["base.block1", "base.drop"]
    assert paths(S.path("**.conv")) == ["base.block1.conv"]
    assert paths(S.path("base")) == ["base"]


def _segments(*segments: str) -> Unit:
    return Unit(".".join(segments), "other", 0, 0, None, None, segments=segments)


# A Keras layer name may contain a dot (keras.applications.MobileNetV2): one segment.
DOTTED = [
    _segments("mobilenetv2_1.00_32"),
    _segments("mobilenetv2_1.00_32", "Conv1"),
    _segments("mobilenetv2_1.00_32", "block_1.a"),
]


def test_a_path_glob_matches_segments_whose_names_have_dots():
    def dotted(selector):
        return [u.segments for u in selector(DOTTED)]

    base, conv, block = (u.segments for u in DOTTED)
    assert DOTTED[0].name == "mobilenetv2_1.00_32" and DOTTED[0].depth == 1
    assert dotted(S.path("mobilenetv2_1.00_32.**")) == [base, conv, block]
    assert dotted(S.path("mobilenetv2_1.00_32")) == [base]
    assert dotted(S.path("mobilenetv2_1.00_32.*")) == [conv, block]
    assert dotted(S.path("*.Conv1")) == [conv]
    assert dotted(S.path("*")) == [base]
    assert dotted(S.path("**.block_1.a")) == [block]
    assert dotted(S.path("00_32.**")) == []
    assert dotted(S.name("mobilenetv2_1.00_32")) == [base]
    assert dotted(S.name("00_32")) == []
    # The same printed path from other segments (two nested layers) matches the same way.
    split = [_segments("mobilenetv2_1", "00_32")]
    assert [u.name for u in S.path("mobilenetv2_1.00_32")(split)] == ["00_32"]
    assert not S.path("mobilenetv2_1.00_32.*")(split)
    with pytest.raises(ValueError, match="is not its segments"):
        Unit("a.b", "other", 0, 0, None, None, segments=("a", "c"))


def test_a_path_glob_on_dot_free_names_is_the_plain_segment_glob():
    # torch and Flax: the segments are the path's dotted parts.
    assert UNITS[3].segments == ("base", "block1", "conv") and UNITS[3].depth == 3
    assert paths(S.path("base*")) == ["base"]
    assert paths(S.path("*.block1.*")) == ["base.block1.conv", "base.block1.preact_bn"]
    assert paths(S.path("base.block1.conv.**")) == ["base.block1.conv"]


def test_name_type_and_bn():
    assert paths(S.name("*preact_bn")) == ["base.block1.preact_bn"]
    assert paths(S.bn()) == ["base.block1.preact_bn"]
    assert paths(S.type("conv", "dense")) == ["stem", "base.block1.conv", "head.dense"]
    assert paths(S.type("norm")) == ["base.block1.preact_bn", "head.norm"]


def test_top_and_from_index_follow_top_level_order_with_subtrees():
    assert paths(S.top(1)) == ["head", "head.dense", "head.norm"]
    assert paths(S.from_index(1)) == paths(S.path("base.**") | S.path("head.**"))
    assert paths(S.from_index(-1)) == paths(S.top(1))


def test_composition():
    assert paths(S.path("base.**") & ~S.bn() & ~S.type("container")) == [
        "base.block1.conv",
        "base.drop",
    ]
    assert paths(S.bn() | S.type("dropout")) == ["base.block1.preact_bn", "base.drop"]
    assert paths(~S.all()) == []
    assert repr(S.path("base.**") & ~S.bn()) == "(path('base.**') & ~bn())"


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: S.type("batchnorms"), ValueError, "unknown kind.*batchnorm, dropout"),
        (lambda: S.path(""), TypeError, "non-empty glob"),
        (lambda: S.name(3), TypeError, "non-empty glob"),
        (lambda: S.top(0), ValueError, "integer >= 1"),
        (lambda: S.from_index("2"), ValueError, "an integer"),
        (lambda: S.bn() & "base", TypeError, "Expected an xfer selector"),
    ],
)
def test_bad_selectors_are_clear_errors(build, error, message):
    with pytest.raises(error, match=message):
        build()
