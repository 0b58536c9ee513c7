"""The ListAgents filter subset (AIP-160) and order_by (AIP-132): what parses, what not."""

from __future__ import annotations

import uuid

import pytest

from services.agent_svc.service.filtering import (
    AgentFilter,
    MetadataEquals,
    ModelEquals,
    NameEquals,
    NamePrefix,
    Ordering,
    OwnerEquals,
    SortField,
    parse_filter,
    parse_order_by,
)
from shared.rpc.errors import InvalidArgument, PermissionDenied

OWNER = uuid.UUID("6f1c8a52-2f0e-4a8e-9c1e-0d8f5b1e2a3c")


@pytest.mark.parametrize(
    ("text", "conditions"),
    [
        ("", ()),
        ("   ", ()),
        ('model = "gpt-4o"', (ModelEquals("gpt-4o"),)),
        ('model="gpt-4o"', (ModelEquals("gpt-4o"),)),
        ('name = "support bot"', (NameEquals("support bot"),)),
        ('name = "sup*"', (NamePrefix("sup"),)),
        ('name = "a*b"', (NameEquals("a*b"),)),
        ('name = "*"', (NamePrefix(""),)),
        ('name = "50%_off*"', (NamePrefix("50%_off"),)),
        ('metadata.team = "search"', (MetadataEquals("team", "search"),)),
        ('metadata.cost-center.v2 = "x"', (MetadataEquals("cost-center.v2", "x"),)),
        ('metadata."kéy" = "x"', (MetadataEquals("kéy", "x"),)),
        (r'metadata."say \"hi\"" = "x"', (MetadataEquals('say "hi"', "x"),)),
        ('metadata."team" = "x"', (MetadataEquals("team", "x"),)),
        (r'name = "say \"hi\" \\ bye"', (NameEquals('say "hi" \\ bye'),)),
        ('name = ""', (NameEquals(""),)),
        (
            'model = "gpt-4o" AND metadata.team = "search" AND name = "sup*"',
            (ModelEquals("gpt-4o"), MetadataEquals("team", "search"), NamePrefix("sup")),
        ),
        ('  model = "a"\tAND\nname = "b"  ', (ModelEquals("a"), NameEquals("b"))),
    ],
)
def test_accepted_filters(text: str, conditions: tuple[object, ...]) -> None:
    assert parse_filter(text, allow_owner=False) == AgentFilter(conditions)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        'metadata. "a b" = "x"',
        'metadata."" = "x"',
        'metadata."a\nb" = "x"',
        'metadata."unterminated = "x"',
        f'metadata."{"k" * 65}" = "x"',
        'model = "a" OR model = "b"',
        'model = "a" and name = "b"',
        'NOT model = "a"',
        'model != "a"',
        'model : "a"',
        "model = gpt-4o",
        "model = 'gpt-4o'",
        'model = "unterminated',
        'model = "bad \\n escape"',
        '(model = "a")',
        'model = "a" AND',
        'AND model = "a"',
        'model = "a" name = "b"',
        'model = "a" ANDname = "b"',
        'description = "x"',
        'metadata = "x"',
        'metadata. = "x"',
        'metadata.a b = "x"',
        'metadata.k"ey = "x"',
        'model.x = "a"',
        "=",
        '"value"',
        "x" * 5000,
    ],
)
def test_rejected_filters_name_the_filter_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, allow_owner=False)
    assert [v.field for v in caught.value.violations] == ["filter"]


@pytest.mark.parametrize(
    "text",
    [
        'name = "a\x00b"',
        'name = "sup\x00*"',
        'model = "gpt-4o\x00"',
        'metadata.team = "\x00"',
        'metadata.team = "a\x1bb"',
        'name = "line\nbreak"',
        'name = "bidi\u202e"',
        'model = "tab\t"',
    ],
)
def test_a_value_no_agent_could_hold_is_refused_on_filter(text: str) -> None:
    """NUL would reach PostgreSQL (which refuses it); other control characters cannot match
    anything stored, since the field itself refuses them."""
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, allow_owner=True)
    assert [v.field for v in caught.value.violations] == ["filter"]
    assert "must not contain control characters" in caught.value.violations[0].description


def test_a_metadata_value_may_hold_what_a_stored_value_may() -> None:
    assert parse_filter('metadata.note = "a\tb\nc"', allow_owner=False) == AgentFilter(
        (MetadataEquals("note", "a\tb\nc"),)
    )


@pytest.mark.parametrize("text", ["x" * 4_000 + ' = "v"', "x" * 4_000, "n" * 4_000 + ' "v"'])
def test_an_error_echoes_at_most_a_short_piece_of_the_filter(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text, allow_owner=False)
    assert len(caught.value.message) < 200


def test_owner_id_is_for_admins_only() -> None:
    text = f'owner_id = "{OWNER}"'
    for not_allowed in (text, 'owner_id = "me"', f'model = "a" AND {text}'):
        with pytest.raises(PermissionDenied) as caught:
            parse_filter(not_allowed, allow_owner=False)
        assert caught.value.reason == "OWNER_FILTER_NOT_ALLOWED"
    assert parse_filter(text, allow_owner=True) == AgentFilter((OwnerEquals(OWNER),))


def test_owner_id_must_be_a_uuid() -> None:
    with pytest.raises(InvalidArgument, match="UUID"):
        parse_filter('owner_id = "me"', allow_owner=True)


def test_canonical_form_ignores_term_order_and_spacing() -> None:
    one = parse_filter('model = "a" AND name = "b*"', allow_owner=False)
    two = parse_filter('name="b*"   AND model="a"', allow_owner=False)
    assert one.canonical() == two.canonical()
    assert one.canonical() != parse_filter('name = "b"', allow_owner=False).canonical()


def test_canonical_form_keeps_escapes_apart() -> None:
    quoted = parse_filter(r'name = "a\" AND name = \"b"', allow_owner=False)
    split = parse_filter('name = "a" AND name = "b"', allow_owner=False)
    assert quoted != split
    assert quoted.canonical() != split.canonical()


@pytest.mark.parametrize(
    ("text", "ordering"),
    [
        ("", Ordering(SortField.CREATE_TIME, descending=True)),
        ("create_time", Ordering(SortField.CREATE_TIME, descending=False)),
        ("create_time desc", Ordering(SortField.CREATE_TIME, descending=True)),
        ("update_time asc", Ordering(SortField.UPDATE_TIME, descending=False)),
        ("  name   DESC ", Ordering(SortField.NAME, descending=True)),
        ("name", Ordering(SortField.NAME, descending=False)),
    ],
)
def test_accepted_order_by(text: str, ordering: Ordering) -> None:
    assert parse_order_by(text) == ordering


@pytest.mark.parametrize(
    "text",
    ["model", "name sideways", "name desc extra", "name,create_time", "-name", "create_time;"],
)
def test_rejected_order_by_names_the_order_by_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_order_by(text)
    assert [v.field for v in caught.value.violations] == ["order_by"]


def test_a_quoted_metadata_key_has_one_spelling() -> None:
    """`metadata."team"` means `metadata.team` (one canonical spelling: streams and page
    tokens compare filters by it); a key only quotes can spell keeps its quotes."""
    quoted = parse_filter('metadata."team" = "x"', allow_owner=False)
    assert quoted.canonical() == parse_filter('metadata.team = "x"', allow_owner=False).canonical()
    odd = parse_filter(r'metadata."say \"hi\" kéy" = "x"', allow_owner=False)
    assert odd.canonical() == r'metadata."say \"hi\" kéy" = "x"'
    assert parse_filter(odd.canonical(), allow_owner=False) == odd
