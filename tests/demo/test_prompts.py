import itertools

from sdserver.demo.dataset import Colour, Shape, parse_prompt
from sdserver.demo.prompts import adherence_cases, colourless_cases, recolour_cases


def test_adherence_cases_are_fixed_and_cover_every_colour_and_shape():
    cases = adherence_cases(96, seed=0)
    assert cases == adherence_cases(96, seed=0)
    assert [c.prompt for c in cases] != [c.prompt for c in adherence_cases(96, seed=1)]
    for block in (cases[:32], cases[32:64], cases[64:96]):
        pairs = {(c.expected["colour"], c.expected["shape"]) for c in block}
        assert pairs == {(str(c), str(s)) for c, s in itertools.product(Colour, Shape)}
    assert len({c.seed for c in cases}) == len(cases)


def test_adherence_cases_name_background_size_and_position_often_and_truthfully():
    cases = adherence_cases(200, seed=3)
    for attribute in ("background", "size", "position"):
        assert sum(attribute in c.expected for c in cases) >= 200 // 5, attribute
    for case in cases:
        assert case.expected == parse_prompt(case.prompt)
        assert case.expected.get("background") != case.expected["colour"]


def test_colourless_cases_never_name_a_colour_nor_rule_red_out():
    cases = colourless_cases(40, seed=0)
    assert all("colour" not in c.expected and "shape" in c.expected for c in cases)
    assert all(c.expected.get("background") != "red" for c in cases)
    assert any("background" in c.expected for c in cases)
    assert {c.expected["shape"] for c in cases} == {str(s) for s in Shape}
    assert not {c.seed for c in cases} & {c.seed for c in adherence_cases(200, seed=0)}


def test_recolour_cases_start_red_and_ask_for_blue():
    cases = recolour_cases(20, seed=0)
    assert cases == recolour_cases(20, seed=0)
    for case in cases:
        assert case.init.colour == Colour.RED and case.init.shape == Shape.CIRCLE
        assert case.init.background not in (Colour.RED, Colour.BLUE)
        assert parse_prompt(case.prompt) == {"colour": "blue", "shape": "circle"}
        assert case.target == Colour.BLUE
    assert len({c.init.position for c in cases}) == 5 and len({c.init.size for c in cases}) == 2
