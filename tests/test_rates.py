"""Rate strings and the Rate type (rategate/rates.py): pure Python, no Redis."""

from __future__ import annotations

import dataclasses

import pytest

from rategate.rates import Rate, parse_rates


# -- good strings ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [
        ("100/minute", 100, 60.0),
        ("100 per minute", 100, 60.0),
        ("100/min", 100, 60.0),
        ("100/m", 100, 60.0),
        ("5/s", 5, 1.0),
        ("5/sec", 5, 1.0),
        ("5/second", 5, 1.0),
        ("5/seconds", 5, 1.0),
        ("10/5 seconds", 10, 5.0),
        ("10/5seconds", 10, 5.0),
        ("10/0.2s", 10, 0.2),
        ("10/1.5 minutes", 10, 90.0),
        ("1000/hour", 1000, 3600.0),
        ("1000/h", 1000, 3600.0),
        ("1000/hr", 1000, 3600.0),
        ("2/day", 2, 86400.0),
        ("2/d", 2, 86400.0),
        ("3/2 days", 3, 172800.0),
        ("1/ms", 1, 0.001),
        ("1/250 milliseconds", 1, 0.25),
        ("  7 / h  ", 7, 3600.0),
        ("7 PER Second", 7, 1.0),
        ("10/MINUTE", 10, 60.0),
        ("1000000000/day", 10**9, 86400.0),
        ("1/366 days", 1, 366 * 86400.0),
    ],
)
def test_parse_good(text: str, limit: int, period: float) -> None:
    r = Rate.parse(text)
    assert (r.limit, r.period, r.burst) == (limit, pytest.approx(period), limit)
    assert type(r.period) is float


def test_rate_constructor_burst_and_defaults() -> None:
    r = Rate(100, 60.0, burst=150)
    assert (r.limit, r.period, r.burst) == (100, 60.0, 150)
    assert Rate(100, 60).burst == 100
    assert type(Rate(100, 60).period) is float
    assert Rate(10, 1) == Rate(10, 1.0) == Rate.parse("10/second")
    assert hash(Rate(10, 1)) == hash(Rate.parse("10/s"))
    assert Rate(10, 1) != Rate(10, 1, burst=11)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.limit = 5  # type: ignore[misc]


# -- key_id and str ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("rate", "key_id"),
    [
        (Rate.parse("10/second"), "10/1000"),
        (Rate.parse("100/minute"), "100/60000"),
        (Rate.parse("10/0.2s"), "10/200"),
        (Rate.parse("1000/hour"), "1000/3600000"),
        (Rate(100, 60.0, burst=150), "100/60000b150"),
        (Rate(100, 60.0, burst=100), "100/60000"),
    ],
)
def test_key_id(rate: Rate, key_id: str) -> None:
    assert rate.key_id == key_id


def test_key_id_changes_with_every_field() -> None:
    ids = {Rate(10, 1).key_id, Rate(11, 1).key_id, Rate(10, 2).key_id, Rate(10, 1, burst=20).key_id}
    assert len(ids) == 4


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (Rate(100, 60), "100/minute"),
        (Rate(10, 1), "10/second"),
        (Rate(1000, 3600), "1000/hour"),
        (Rate(2, 86400), "2/day"),
        (Rate(10, 5), "10/5 seconds"),
        (Rate(10, 7200), "10/2 hours"),
        (Rate(10, 90), "10/90 seconds"),
        (Rate(10, 0.2), "10/0.2 seconds"),
        (Rate(100, 60, burst=150), "100/minute (burst 150)"),
    ],
)
def test_str(rate: Rate, text: str) -> None:
    assert str(rate) == text


@pytest.mark.parametrize("rate", [Rate(100, 60), Rate(10, 5), Rate(10, 7200), Rate(3, 0.2), Rate(1, 172800)])
def test_str_round_trips(rate: Rate) -> None:
    assert Rate.parse(str(rate)) == rate


# -- parse_rates ---------------------------------------------------------------
def test_parse_rates_forms() -> None:
    two = (Rate(10, 1), Rate(1000, 3600))
    assert parse_rates("10/s; 1000/hour") == two
    assert parse_rates("10/s, 1000/hour") == two
    assert parse_rates("10/s;1000/hour;") == two
    assert parse_rates(["10/s", "1000/hour"]) == two
    assert parse_rates(("10/s", Rate(1000, 3600))) == two
    assert parse_rates(["10/s; 1000/hour"]) == two
    assert parse_rates(Rate(5, 60)) == (Rate(5, 60),)
    assert parse_rates("5/minute") == (Rate(5, 60),)
    assert isinstance(parse_rates(["5/minute"]), tuple)


def test_parse_rates_keeps_order() -> None:
    assert [r.limit for r in parse_rates("1000/hour; 10/s; 50/minute")] == [1000, 10, 50]


def test_sixteen_rates_is_the_most() -> None:
    sixteen = [Rate(i, 60) for i in range(1, 17)]
    assert len(parse_rates(sixteen)) == 16
    with pytest.raises(ValueError, match="at most 16 rates.*17"):
        parse_rates(sixteen + [Rate(99, 60)])


# -- errors name the bad part ------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "must_name"),
    [
        ("100/fortnight", "fortnight"),      # unknown unit
        ("100/Fortnight", "Fortnight"),      # ... as the user wrote it
        ("abc", "abc"),                      # nothing like a rate
        ("", "''"),
        ("100", "'100'"),                    # no period
        ("10/5", "'10/5'"),                  # a count but no unit
        ("-5/minute", "-5/minute"),          # sign
        ("1.5/minute", "1.5/minute"),        # fractional limit
        ("10/minute extra", "10/minute extra"),
        ("10 minute", "10 minute"),          # no separator
        ("0/minute", "limit"),               # limit 0
        ("10/0 seconds", "period"),          # period 0
        ("10/0.0 s", "period"),
        ("10/0.0001 seconds", "period"),     # below 1 ms
        ("10/400 days", "period"),           # above a year
        ("2000000000/s", "limit"),           # above 10**9
    ],
)
def test_parse_errors_name_the_bad_part(text: str, must_name: str) -> None:
    with pytest.raises(ValueError) as info:
        Rate.parse(text)
    msg = str(info.value)
    assert must_name in msg
    # Every string error quotes the whole input too, so a user can find it.
    assert repr(text) in msg


def test_unknown_unit_lists_the_good_ones() -> None:
    with pytest.raises(ValueError, match="unknown unit 'fortnight'") as info:
        Rate.parse("3/fortnight")
    for unit in ("second", "minute", "hour", "day"):
        assert unit in str(info.value)


def test_shape_error_shows_an_example() -> None:
    with pytest.raises(ValueError, match=r'"100/minute"'):
        Rate.parse("lots")


@pytest.mark.parametrize("bad", [5, None, b"10/s", 1.5])
def test_parse_needs_a_string(bad: object) -> None:
    with pytest.raises(ValueError, match="a rate must be a string") as info:
        Rate.parse(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("args", "kwargs", "must_name"),
    [
        ((0, 60), {}, "limit"),
        ((-1, 60), {}, "limit"),
        ((1.5, 60), {}, "limit"),
        ((True, 60), {}, "limit"),
        (("10", 60), {}, "limit"),
        ((10**9 + 1, 60), {}, "limit"),
        ((10, 0), {}, "period"),
        ((10, -1), {}, "period"),
        ((10, "60"), {}, "period"),
        ((10, True), {}, "period"),
        ((10, 0.0001), {}, "period"),
        ((10, 367 * 86400), {}, "period"),
        ((10, 60), {"burst": 0}, "burst"),
        ((10, 60), {"burst": -3}, "burst"),
        ((10, 60), {"burst": 2.5}, "burst"),
        ((10, 60), {"burst": True}, "burst"),
        ((10, 60), {"burst": 10**9 + 1}, "burst"),
    ],
)
def test_rate_constructor_errors_name_the_field(args: tuple, kwargs: dict, must_name: str) -> None:
    with pytest.raises(ValueError) as info:
        Rate(*args, **kwargs)
    msg = str(info.value)
    assert must_name in msg
    bad = kwargs["burst"] if kwargs else (args[0] if must_name == "limit" else args[1])
    assert str(bad) in msg or repr(bad) in msg


@pytest.mark.parametrize(
    ("rates", "must_name"),
    [
        ("", "empty rate string"),
        (";", "empty rate string"),
        (" , ", "empty rate string"),
        ([], "no rate given"),
        ((), "no rate given"),
        ([5], "got 5"),
        (["10/s", None], "got None"),
        (5, "got 5"),
        (None, "got None"),
        ({"10/s"}, "got {'10/s'}"),
        ("10/s; 5/fortnight", "fortnight"),
        (["10/s", "5/fortnight"], "'5/fortnight'"),
        ("10/s; 10/second", "twice"),
        ([Rate(10, 1), "10/s"], "twice"),
    ],
)
def test_parse_rates_errors(rates: object, must_name: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rates(rates)  # type: ignore[arg-type]
    assert must_name in str(info.value)


def test_same_limit_different_burst_is_not_a_duplicate() -> None:
    rates = parse_rates([Rate(10, 1), Rate(10, 1, burst=20)])
    assert len(rates) == 2
