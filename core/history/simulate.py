"""A seeded synthetic world of card transactions with four labelled fraud patterns.

Customers live in a few cities across several countries; each has one or two cards, one
or two usual devices, a usual IP, a spending level and favourite merchants. Legitimate
transactions follow a daily rhythm in local time: card present at merchants in the home
city (or a trip city, for a few travellers), e-commerce from the usual device and IP, and
ATM withdrawals. Fraud is injected on top, per `FraudPattern`.

Amounts are the cardholder's billing amount, in the currency of the card's home country.
Latitude, longitude and country say where the transaction happened: the terminal for
card present and ATM, the buyer's device for e-commerce, unknown (NaN; the merchant's
country) for other card-not-present. Every fraud is reported: `fraud_reported_time_ms`
is the incident's last transaction plus 1 to 30 days, lognormal around 5 days.

Everything is vectorized numpy; each stage draws from its own child of one SeedSequence,
so a seed gives the same arrays bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from core.history.table import Channel, History

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000


class FraudPattern(IntEnum):
    """Which mechanism produced a fraudulent row (NONE for legitimate rows)."""

    NONE = 0
    CARD_TESTING = 1  # a burst of 5-30 tiny e-commerce payments within minutes, new device and IP
    ACCOUNT_TAKEOVER = 2  # new device and IP far from home, then larger e-commerce payments over hours
    COMPROMISED_MERCHANT = 3  # cards seen at a breached merchant, abused online days later by one ring
    LARGE_AMOUNT = 4  # one to three payments 5-20x the card's mean, mostly electronics or jewelry


@dataclass(frozen=True, slots=True, eq=False)
class SimulatedWorld:
    """A simulated history with the ground truth behind its labels."""

    history: History
    fraud_pattern: np.ndarray  # int8 FraudPattern per row of `history`
    breached_merchant_ids: np.ndarray  # object array: merchants breached by COMPROMISED_MERCHANT


# name, country, latitude, longitude, UTC offset (hours), share of customers and merchants
_CITIES = (
    ("New York", "US", 40.71, -74.01, -5, 10), ("Chicago", "US", 41.88, -87.63, -6, 5),
    ("Los Angeles", "US", 34.05, -118.24, -8, 7), ("Toronto", "CA", 43.65, -79.38, -5, 4),
    ("London", "GB", 51.51, -0.13, 0, 7), ("Manchester", "GB", 53.48, -2.24, 0, 3),
    ("Paris", "FR", 48.86, 2.35, 1, 6), ("Lyon", "FR", 45.76, 4.84, 1, 2),
    ("Berlin", "DE", 52.52, 13.40, 1, 4), ("Munich", "DE", 48.14, 11.58, 1, 3),
    ("Madrid", "ES", 40.42, -3.70, 1, 4), ("Amsterdam", "NL", 52.37, 4.90, 1, 3),
    ("Sao Paulo", "BR", -23.55, -46.63, -3, 5), ("Sydney", "AU", -33.87, 151.21, 10, 3),
    ("Singapore", "SG", 1.35, 103.82, 8, 3), ("Tokyo", "JP", 35.68, 139.69, 9, 5),
    ("Lagos", "NG", 6.52, 3.38, 1, 2),
)
# country -> (currency, minor units per US cent)
_CURRENCIES = {
    "US": ("USD", 1.0), "CA": ("CAD", 1.36), "GB": ("GBP", 0.79), "FR": ("EUR", 0.92),
    "DE": ("EUR", 0.92), "ES": ("EUR", 0.92), "NL": ("EUR", 0.92), "BR": ("BRL", 5.0),
    "AU": ("AUD", 1.5), "SG": ("SGD", 1.35), "JP": ("JPY", 1.5), "NG": ("NGN", 15.0),
}
_LOCAL, _ONLINE, _ATM = 0, 1, 2
# MCC, kind, share within its kind, typical ticket (US cents), e-commerce share (the rest is
# card present for local merchants, other card-not-present for online ones)
_MCCS = (
    ("5411", _LOCAL, 10, 4500, 0.03), ("5812", _LOCAL, 8, 3500, 0.02), ("5814", _LOCAL, 8, 1200, 0.05),
    ("5541", _LOCAL, 6, 4500, 0.0), ("5912", _LOCAL, 4, 2500, 0.05), ("5311", _LOCAL, 3, 7000, 0.25),
    ("5691", _LOCAL, 4, 6000, 0.3), ("5732", _LOCAL, 2, 25000, 0.3), ("5944", _LOCAL, 1, 40000, 0.2),
    ("7011", _LOCAL, 2, 18000, 0.5), ("4121", _LOCAL, 3, 2200, 0.6),
    ("5999", _ONLINE, 6, 4000, 1.0), ("5815", _ONLINE, 5, 900, 1.0), ("5967", _ONLINE, 2, 3000, 0.7),
    ("4899", _ONLINE, 3, 1500, 0.2), ("4511", _ONLINE, 2, 40000, 0.9), ("5732", _ONLINE, 2, 30000, 1.0),
    ("6011", _ATM, 1, 10000, 0.0),
)
_TESTING_MCCS = ("5815", "5999", "5967", "4899")  # cheap digital goods: where stolen cards are tried
_CASHOUT_MCCS = ("5732", "4511", "5999", "5944")  # resaleable, high-ticket goods
_HOUR_WEIGHTS = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.2, 0.5, 1.0, 1.4, 1.5, 1.6, 1.8,
                          2.0, 1.8, 1.6, 1.6, 1.7, 1.9, 2.0, 1.9, 1.6, 1.2, 0.8, 0.5])
_FAVOURITE_WEIGHTS = np.array([0.3, 0.22, 0.17, 0.13, 0.1, 0.08])  # per favourite local merchant
_FAR_KM = 1500.0  # an account takeover comes from a city at least this far from home

# Incidence per card and day at fraud_scale=1, chosen for about 1% fraud overall.
_CARD_TESTING_PER_CARD_DAY = 2.5e-4
_TAKEOVER_PER_CARD_DAY = 5e-4
_LARGE_AMOUNT_PER_CARD_DAY = 1.2e-3
_BREACH_VICTIMS_PER_CARD_DAY = 1.6e-3  # cards abused after a merchant breach


def simulate(
    *,
    num_days: int = 30,
    num_cards: int = 5000,
    num_merchants: int = 800,
    seed: int = 7,
    start_time_ms: int = 1_767_225_600_000,
    fraud_scale: float = 1.0,
    progress: bool = False,
) -> History:
    """A synthetic labelled history, sorted by time; `simulate_world` also returns the patterns.

    The defaults give about 200k transactions with about 1% fraud; the count grows with
    num_days * num_cards. `fraud_scale` multiplies the incidence of every pattern (0: none).
    """
    return simulate_world(
        num_days=num_days, num_cards=num_cards, num_merchants=num_merchants, seed=seed,
        start_time_ms=start_time_ms, fraud_scale=fraud_scale, progress=progress,
    ).history


def simulate_world(
    *,
    num_days: int = 30,
    num_cards: int = 5000,
    num_merchants: int = 800,
    seed: int = 7,
    start_time_ms: int = 1_767_225_600_000,
    fraud_scale: float = 1.0,
    progress: bool = False,
) -> SimulatedWorld:
    """Like `simulate`, plus the FraudPattern of every row and the breached merchants.

    With fraud_scale > 0 every pattern occurs at least once (compromised merchant needs
    num_days >= 2), so small worlds still show all four.
    """
    _check_arguments(num_days, num_cards, num_merchants, fraud_scale)
    step = _progress_bar(progress, total=7 if fraud_scale > 0 else 3)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    world = _World.build(rngs[0], num_cards, num_merchants, num_days)
    step("world")
    legit = _legit_rows(rngs[1], world)
    card_mean = _card_mean_amount(world, legit)
    step("legitimate")
    parts = [legit]
    if fraud_scale > 0:
        card_days = num_cards * num_days * fraud_scale
        parts.append(_card_testing(rngs[2], world, _incidents(rngs[2], _CARD_TESTING_PER_CARD_DAY * card_days)))
        step("card testing")
        parts.append(_account_takeover(rngs[3], world, card_mean,
                                       _incidents(rngs[3], _TAKEOVER_PER_CARD_DAY * card_days)))
        step("account takeover")
        victims = _incidents(rngs[4], _BREACH_VICTIMS_PER_CARD_DAY * card_days)
        cm_rows, breached = _compromised_merchant(rngs[4], world, legit, card_mean, victims)
        parts.append(cm_rows)
        step("compromised merchant")
        parts.append(_large_amount(rngs[5], world, legit, card_mean,
                                   _incidents(rngs[5], _LARGE_AMOUNT_PER_CARD_DAY * card_days)))
        step("large amount")
    else:
        breached = np.empty(0, dtype=np.int64)
    result = _assemble(world, parts, start_time_ms, breached)
    step("assemble")
    return result


def _check_arguments(num_days: int, num_cards: int, num_merchants: int, fraud_scale: float) -> None:
    if num_days < 1:
        raise ValueError(f"num_days: expected at least 1, got {num_days}")
    if num_cards < 10:
        raise ValueError(f"num_cards: expected at least 10, got {num_cards}")
    if num_merchants < 4 * len(_CITIES):
        raise ValueError(
            f"num_merchants: expected at least {4 * len(_CITIES)} so that every one of the "
            f"{len(_CITIES)} cities has shops and an ATM, got {num_merchants}"
        )
    if not np.isfinite(fraud_scale) or fraud_scale < 0:
        raise ValueError(f"fraud_scale: expected a finite number >= 0, got {fraud_scale}")


def _progress_bar(enabled: bool, *, total: int) -> Callable[[str], None]:
    if not enabled:
        return lambda stage: None
    from core.offline.progress import progress

    bar = progress(total, "simulate", "stage")
    done = 0

    def step(stage: str) -> None:
        nonlocal done
        if hasattr(bar, "set_postfix_str"):  # a terminal's bar names the stage it is in
            bar.set_postfix_str(stage)
        bar.update(1)
        done += 1
        if done >= total:
            bar.close()

    return step


def _incidents(rng: np.random.Generator, expected: float) -> int:
    # At least one of each pattern, so that a small world still shows all four.
    return max(1, int(rng.poisson(expected)))


def _random_ids(rng: np.random.Generator, n: int, prefix: str) -> np.ndarray:
    # Random rather than sequential, so a fraudster's device cannot be told by its number.
    return np.array([f"{prefix}{x:010x}" for x in rng.integers(0, 2**40, n)], dtype=object)


def _random_ips(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.array([f"10.{x >> 16}.{(x >> 8) & 255}.{x & 255}" for x in rng.integers(0, 2**24, n)],
                    dtype=object)


def _id_strings(prefix: str, n: int, width: int) -> np.ndarray:
    width = max(width, len(str(max(n - 1, 0))))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def _distance_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dlat, dlon = p2 - p1, np.radians(lon2 - lon1)
    a = np.sin(dlat / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    result: np.ndarray = 2 * 6371.0 * np.arcsin(np.sqrt(a))
    return result


@dataclass(frozen=True, slots=True)
class _GroupedChoice:
    """Weighted draws of a member within a group (a merchant within a city), vectorized."""

    members: np.ndarray  # member indices, sorted by group
    cumulative: np.ndarray  # running sum of weights along `members`
    low: np.ndarray  # per group: the running sum before its first member
    high: np.ndarray  # per group: the running sum after its last member

    @classmethod
    def build(cls, groups: np.ndarray, weights: np.ndarray, num_groups: int, members: np.ndarray) -> _GroupedChoice:
        order = np.argsort(groups, kind="stable")
        cumulative = np.cumsum(weights[order])
        ends = np.searchsorted(groups[order], np.arange(num_groups), side="right")
        starts = np.searchsorted(groups[order], np.arange(num_groups), side="left")
        padded = np.concatenate([[0.0], cumulative])
        return cls(members[order], cumulative, padded[starts], padded[ends])

    def draw(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
        u = self.low[groups] + rng.random(len(groups)) * (self.high[groups] - self.low[groups])
        position = np.minimum(np.searchsorted(self.cumulative, u, side="right"), len(self.members) - 1)
        chosen: np.ndarray = self.members[position]
        return chosen


@dataclass(frozen=True, slots=True)
class _World:
    """Cities, merchants, customers and cards: everything drawn before the first transaction."""

    num_days: int
    city_lat: np.ndarray
    city_lon: np.ndarray
    city_country: np.ndarray  # index into `countries`
    countries: tuple[str, ...]
    merchant_kind: np.ndarray
    merchant_mcc: np.ndarray  # object array of str
    merchant_city: np.ndarray
    merchant_lat: np.ndarray
    merchant_lon: np.ndarray
    merchant_ticket: np.ndarray  # US cents
    merchant_ec_share: np.ndarray
    local_choice: _GroupedChoice  # by city
    atm_choice: _GroupedChoice  # by city
    online_choice: _GroupedChoice  # one group
    card_customer: np.ndarray
    card_rate: np.ndarray  # transactions per day
    card_currency: np.ndarray  # index into `currencies`
    currencies: tuple[str, ...]
    currency_factor: np.ndarray  # minor units per US cent
    card_trip: np.ndarray  # (start_ms, end_ms, city) per card; start = end = -1 when none
    customer_known: np.ndarray  # bool per customer
    customer_city: np.ndarray
    customer_lat: np.ndarray
    customer_lon: np.ndarray
    customer_spend: np.ndarray
    customer_online_share: np.ndarray
    customer_devices: np.ndarray  # (num_customers, 2) object; the same device twice for one-device customers
    customer_ip: np.ndarray
    favourite_local: np.ndarray  # (num_customers, len(_FAVOURITE_WEIGHTS)) merchant indices
    favourite_online: np.ndarray  # (num_customers, 3)

    @property
    def period_ms(self) -> int:
        return self.num_days * DAY_MS

    @classmethod
    def build(cls, rng: np.random.Generator, num_cards: int, num_merchants: int, num_days: int) -> _World:
        num_cities = len(_CITIES)
        city_weight = np.array([c[5] for c in _CITIES], dtype=float)
        city_weight /= city_weight.sum()
        countries = tuple(dict.fromkeys(c[1] for c in _CITIES))
        city_country = np.array([countries.index(c[1]) for c in _CITIES])
        city_lat = np.array([c[2] for c in _CITIES])
        city_lon = np.array([c[3] for c in _CITIES])
        currencies = tuple(dict.fromkeys(v[0] for v in _CURRENCIES.values()))
        country_currency = np.array([currencies.index(_CURRENCIES[c][0]) for c in countries])
        currency_factor = np.array([next(v[1] for v in _CURRENCIES.values() if v[0] == cur) for cur in currencies])

        # Merchants: ATMs and local shops get one per city first so no city is without them.
        num_atm = max(num_cities, round(0.06 * num_merchants))
        num_online = round(0.24 * num_merchants)
        num_local = num_merchants - num_atm - num_online
        kind = np.repeat([_LOCAL, _ONLINE, _ATM], [num_local, num_online, num_atm])
        mcc_kind = np.array([m[1] for m in _MCCS])
        mcc_share = np.array([m[2] for m in _MCCS], dtype=float)
        mcc = np.empty(num_merchants, dtype=np.int64)
        city = np.empty(num_merchants, dtype=np.int64)
        for k, count in ((_LOCAL, num_local), (_ONLINE, num_online), (_ATM, num_atm)):
            options = np.flatnonzero(mcc_kind == k)
            mcc[kind == k] = rng.choice(options, count, p=mcc_share[options] / mcc_share[options].sum())
            # Online shops sit in a random city (their country is used); the others spread first.
            spread = np.arange(count) if k != _ONLINE else np.full(count, num_cities)
            city[kind == k] = np.where(spread < num_cities, spread, rng.choice(num_cities, count, p=city_weight))
        ticket = np.array([m[3] for m in _MCCS], dtype=float)[mcc] * rng.lognormal(0.0, 0.4, num_merchants)
        popularity = rng.lognormal(0.0, 1.0, num_merchants)
        index = np.arange(num_merchants)
        local, atm, online = kind == _LOCAL, kind == _ATM, kind == _ONLINE

        # Customers: mostly one card each, some two.
        cards_per_customer = np.where(rng.random(num_cards) < 0.15, 2, 1)
        num_customers = int(np.searchsorted(np.cumsum(cards_per_customer), num_cards) + 1)
        card_customer = np.repeat(np.arange(num_customers), cards_per_customer[:num_customers])[:num_cards]
        customer_city = rng.choice(num_cities, num_customers, p=city_weight)
        devices = _random_ids(rng, 2 * num_customers, "dev_").reshape(num_customers, 2)
        one_device = rng.random(num_customers) < 0.6
        devices[one_device, 1] = devices[one_device, 0]
        favourite_local = _GroupedChoice.build(city[local], popularity[local], num_cities, index[local]).draw(
            rng, np.repeat(customer_city, len(_FAVOURITE_WEIGHTS))).reshape(num_customers, -1)
        online_choice = _GroupedChoice.build(np.zeros(online.sum(), dtype=np.int64), popularity[online], 1,
                                             index[online])
        favourite_online = online_choice.draw(rng, np.zeros(3 * num_customers, dtype=np.int64))

        # A few travellers: one trip of 2 to 6 days to another city.
        trip = np.full((num_cards, 3), -1, dtype=np.int64)
        travels = rng.random(num_cards) < min(0.5, 0.03 * num_days / 30)
        n_trips = int(travels.sum())
        trip_start = rng.integers(0, num_days * DAY_MS, n_trips)
        trip[travels, 0] = trip_start
        trip[travels, 1] = trip_start + rng.integers(2 * DAY_MS, 6 * DAY_MS, n_trips)
        home = customer_city[card_customer[travels]]
        trip[travels, 2] = (home + rng.integers(1, num_cities, n_trips)) % num_cities

        rate_mu = np.log(1.3) - 0.6**2 / 2  # lognormal with mean 1.3 transactions a day
        return cls(
            num_days=num_days, city_lat=city_lat, city_lon=city_lon, city_country=city_country,
            countries=countries, merchant_kind=kind,
            merchant_mcc=np.array([m[0] for m in _MCCS], dtype=object)[mcc], merchant_city=city,
            merchant_lat=city_lat[city] + rng.normal(0, 0.04, num_merchants),
            merchant_lon=city_lon[city] + rng.normal(0, 0.04, num_merchants),
            merchant_ticket=ticket, merchant_ec_share=np.array([m[4] for m in _MCCS])[mcc],
            local_choice=_GroupedChoice.build(city[local], popularity[local], num_cities, index[local]),
            atm_choice=_GroupedChoice.build(city[atm], popularity[atm], num_cities, index[atm]),
            online_choice=online_choice,
            card_customer=card_customer, card_rate=rng.lognormal(rate_mu, 0.6, num_cards),
            card_currency=country_currency[city_country[customer_city[card_customer]]],
            currencies=currencies, currency_factor=currency_factor, card_trip=trip,
            customer_known=rng.random(num_customers) >= 0.03, customer_city=customer_city,
            customer_lat=city_lat[customer_city] + rng.normal(0, 0.05, num_customers),
            customer_lon=city_lon[customer_city] + rng.normal(0, 0.05, num_customers),
            customer_spend=rng.lognormal(0.0, 0.5, num_customers),
            customer_online_share=rng.beta(2.0, 6.0, num_customers), customer_devices=devices,
            customer_ip=_random_ips(rng, num_customers), favourite_local=favourite_local,
            favourite_online=favourite_online.reshape(num_customers, 3),
        )


@dataclass(frozen=True, slots=True)
class _Rows:
    """Transactions before assembly: indices into the world, times relative to the start."""

    card: np.ndarray
    time_ms: np.ndarray
    merchant: np.ndarray
    channel: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray
    country: np.ndarray  # index into world.countries
    device_id: np.ndarray  # object array of str
    ip_address: np.ndarray  # object array of str
    amount_minor: np.ndarray
    reported_ms: np.ndarray  # -1 for legitimate rows
    pattern: FraudPattern


def _legit_rows(rng: np.random.Generator, world: _World) -> _Rows:
    card = np.repeat(np.arange(len(world.card_rate)), rng.poisson(world.card_rate * world.num_days))
    n = len(card)
    customer = world.card_customer[card]
    home = world.customer_city[customer]
    hour = rng.choice(24, n, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    local_ms = rng.integers(0, world.num_days, n) * DAY_MS + hour * HOUR_MS + rng.integers(0, HOUR_MS, n)
    utc_offset_ms = np.array([c[4] for c in _CITIES])[home] * HOUR_MS
    time_ms = (local_ms - utc_offset_ms) % world.period_ms
    trip = world.card_trip[card]
    travelling = (trip[:, 0] <= time_ms) & (time_ms < trip[:, 1])
    city = np.where(travelling, trip[:, 2], home)

    u = rng.random(n)
    atm = u < 0.04
    online = ~atm & (u < 0.04 + world.customer_online_share[customer])
    local = ~atm & ~online
    merchant = np.empty(n, dtype=np.int64)
    favourite = local & ~travelling & (rng.random(n) < 0.7)
    slot = np.searchsorted(np.cumsum(_FAVOURITE_WEIGHTS), rng.random(int(favourite.sum())) * _FAVOURITE_WEIGHTS.sum())
    merchant[favourite] = world.favourite_local[customer[favourite], slot]
    merchant[local & ~favourite] = world.local_choice.draw(rng, city[local & ~favourite])
    favourite = online & (rng.random(n) < 0.6)
    merchant[favourite] = world.favourite_online[customer[favourite], rng.integers(0, 3, int(favourite.sum()))]
    merchant[online & ~favourite] = world.online_choice.draw(rng, np.zeros(int((online & ~favourite).sum()), int))
    merchant[atm] = world.atm_choice.draw(rng, city[atm])

    ecommerce = rng.random(n) < world.merchant_ec_share[merchant]
    channel = np.where(atm, Channel.ATM, np.where(
        ecommerce, Channel.ECOMMERCE, np.where(local, Channel.CARD_PRESENT, Channel.CARD_NOT_PRESENT_OTHER)))
    # Card present happens at the terminal; e-commerce where the buyer's device is.
    latitude = world.merchant_lat[merchant].copy()
    longitude = world.merchant_lon[merchant].copy()
    country = world.city_country[world.merchant_city[merchant]]
    ec = channel == Channel.ECOMMERCE
    latitude[ec] = np.where(travelling[ec], world.city_lat[city[ec]], world.customer_lat[customer[ec]])
    longitude[ec] = np.where(travelling[ec], world.city_lon[city[ec]], world.customer_lon[customer[ec]])
    latitude[ec] += rng.normal(0, 0.01, int(ec.sum()))
    longitude[ec] += rng.normal(0, 0.01, int(ec.sum()))
    country[ec] = world.city_country[city[ec]]
    cnp_other = channel == Channel.CARD_NOT_PRESENT_OTHER
    latitude[cnp_other] = np.nan
    longitude[cnp_other] = np.nan

    device = np.full(n, "", dtype=object)
    ip = np.full(n, "", dtype=object)
    ec_rows = np.flatnonzero(ec)
    device[ec_rows] = world.customer_devices[customer[ec_rows], rng.integers(0, 2, len(ec_rows))]
    ip[ec_rows] = world.customer_ip[customer[ec_rows]]
    # Legitimate noise, so that a new device or IP is a signal rather than a label:
    # a new phone now and then, and a hotel or mobile IP when away or on the move.
    new_device = ec_rows[rng.random(len(ec_rows)) < 0.01]
    device[new_device] = _random_ids(rng, len(new_device), "dev_")
    new_ip = ec_rows[travelling[ec_rows] | (rng.random(len(ec_rows)) < 0.08)]
    ip[new_ip] = _random_ips(rng, len(new_ip))

    cents = world.merchant_ticket[merchant] * world.customer_spend[customer] * rng.lognormal(0.0, 0.5, n)
    cents = np.where(atm, 2000.0 * np.maximum(1.0, np.round(cents / 2000.0)), cents)
    # Now and then a genuine splurge, so that a large amount alone does not mean fraud.
    splurge = ~atm & (rng.random(n) < 0.003)
    cents[splurge] *= rng.uniform(4.0, 15.0, int(splurge.sum()))
    amount = np.maximum(1, np.round(cents * world.currency_factor[world.card_currency[card]])).astype(np.int64)
    return _Rows(card, time_ms, merchant, channel.astype(np.int8), latitude, longitude, country, device, ip,
                 amount, np.full(n, -1, dtype=np.int64), FraudPattern.NONE)


def _card_mean_amount(world: _World, legit: _Rows) -> np.ndarray:
    """Mean legitimate amount per card in its currency; an estimate for cards without any."""
    num_cards = len(world.card_rate)
    count = np.bincount(legit.card, minlength=num_cards)
    total = np.bincount(legit.card, weights=legit.amount_minor, minlength=num_cards)
    estimate = 4000.0 * world.customer_spend[world.card_customer] * world.currency_factor[world.card_currency]
    mean: np.ndarray = np.where(count > 0, total / np.maximum(count, 1), estimate)
    return mean


def _offsets_within(rng: np.random.Generator, sizes: np.ndarray, mean_gap_ms: float) -> np.ndarray:
    """Per row: the time since its incident's first row, exponential gaps between rows."""
    gaps = rng.exponential(mean_gap_ms, int(sizes.sum()))
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    gaps[starts == np.arange(len(gaps))] = 0.0
    running = np.cumsum(gaps)
    offsets: np.ndarray = (running - running[starts]).astype(np.int64)
    return offsets


def _merchants_with(world: _World, mccs: tuple[str, ...], kind: int) -> np.ndarray:
    chosen = np.flatnonzero(np.isin(world.merchant_mcc, mccs) & (world.merchant_kind == kind))
    return chosen if len(chosen) else np.flatnonzero(world.merchant_kind == kind)


def _far_city(rng: np.random.Generator, world: _World, home_city: np.ndarray) -> np.ndarray:
    """A city at least _FAR_KM from each home city, uniformly among those."""
    distance = _distance_km(world.city_lat[:, None], world.city_lon[:, None], world.city_lat, world.city_lon)
    far = distance[home_city] >= _FAR_KM
    # Random keys, masked to the far cities: the argmax is a uniform choice among them.
    city: np.ndarray = np.argmax(np.where(far, rng.random(far.shape), -1.0), axis=1)
    return city


def _fraud_rows(rng: np.random.Generator, world: _World, *, card: np.ndarray, time_ms: np.ndarray,
                merchant: np.ndarray, city: np.ndarray, device: np.ndarray, ip: np.ndarray,
                amount_minor: np.ndarray, incident: np.ndarray, pattern: FraudPattern,
                card_present: np.ndarray | None = None) -> _Rows:
    """E-commerce fraud rows located in `city` (card present ones at the merchant), with report times."""
    n = len(card)
    time_ms = np.clip(time_ms, 0, world.period_ms - 1)
    present = np.zeros(n, dtype=bool) if card_present is None else card_present
    latitude = np.where(present, world.merchant_lat[merchant], world.city_lat[city] + rng.normal(0, 0.05, n))
    longitude = np.where(present, world.merchant_lon[merchant], world.city_lon[city] + rng.normal(0, 0.05, n))
    country = np.where(present, world.city_country[world.merchant_city[merchant]], world.city_country[city])
    channel = np.where(present, Channel.CARD_PRESENT, Channel.ECOMMERCE).astype(np.int8)
    # One report per incident, after its last row: the cardholder disputes them together.
    last = np.zeros(int(incident.max()) + 1 if n else 0, dtype=np.int64)
    np.maximum.at(last, incident, time_ms)
    delay_days = np.clip(rng.lognormal(np.log(5.0), 0.7, len(last)), 1.0, 30.0)
    reported = last + (delay_days * DAY_MS).astype(np.int64)
    return _Rows(card, time_ms, merchant, channel, latitude, longitude, country,
                 np.where(present, "", device).astype(object), np.where(present, "", ip).astype(object),
                 np.maximum(1, amount_minor).astype(np.int64), reported[incident], pattern)


def _card_testing(rng: np.random.Generator, world: _World, bursts: int) -> _Rows:
    sizes = rng.integers(5, 31, bursts)
    incident = np.repeat(np.arange(bursts), sizes)
    start = rng.integers(0, world.period_ms - HOUR_MS, bursts)
    time_ms = start[incident] + _offsets_within(rng, sizes, 20_000.0)
    # Each burst tries one to three cheap digital-goods merchants the card never used.
    shops = _merchants_with(world, _TESTING_MCCS, _ONLINE)
    burst_shops = rng.choice(shops, (bursts, 3))
    used = rng.integers(0, rng.integers(1, 4, bursts)[incident])
    card = rng.integers(0, len(world.card_rate), bursts)
    city = rng.integers(0, len(_CITIES), bursts)
    return _fraud_rows(
        rng, world, card=card[incident], time_ms=time_ms, merchant=burst_shops[incident, used],
        city=city[incident], device=_random_ids(rng, bursts, "dev_")[incident],
        ip=_random_ips(rng, bursts)[incident], amount_minor=rng.integers(100, 501, len(incident)),
        incident=incident, pattern=FraudPattern.CARD_TESTING,
    )


def _account_takeover(rng: np.random.Generator, world: _World, card_mean: np.ndarray, takeovers: int) -> _Rows:
    sizes = rng.integers(3, 11, takeovers)
    incident = np.repeat(np.arange(takeovers), sizes)
    card = rng.integers(0, len(world.card_rate), takeovers)
    start = rng.integers(0, world.period_ms - 12 * HOUR_MS, takeovers)
    city = _far_city(rng, world, world.customer_city[world.card_customer[card]])
    shops = _merchants_with(world, _CASHOUT_MCCS, _ONLINE)
    rows_card = card[incident]
    return _fraud_rows(
        rng, world, card=rows_card, time_ms=start[incident] + _offsets_within(rng, sizes, 30.0 * MINUTE_MS),
        merchant=rng.choice(shops, len(incident)), city=city[incident],
        device=_random_ids(rng, takeovers, "dev_")[incident], ip=_random_ips(rng, takeovers)[incident],
        amount_minor=np.round(card_mean[rows_card] * rng.uniform(1.5, 5.0, len(incident))),
        incident=incident, pattern=FraudPattern.ACCOUNT_TAKEOVER,
    )


def _compromised_merchant(rng: np.random.Generator, world: _World, legit: _Rows, card_mean: np.ndarray,
                          victims: int) -> tuple[_Rows, np.ndarray]:
    """Breach busy merchants until about `victims` cards seen there are abused online days later.

    Counting victims rather than breaches keeps this pattern's share steady from seed to
    seed, whatever the popularity of the merchants that happen to be breached.
    """
    window_days = int(np.clip(world.num_days // 5, 1, 5))
    nothing = (_no_rows(FraudPattern.COMPROMISED_MERCHANT), np.empty(0, dtype=np.int64))
    if world.num_days < window_days + 1:
        return nothing
    cards: list[np.ndarray] = []
    abuse_start: list[np.ndarray] = []
    breached: list[int] = []
    total = 0
    for _ in range(10 * victims):  # bounded: a breach may find no cards in its window
        if total >= victims:
            break
        window_start = int(rng.integers(0, world.num_days - window_days)) * DAY_MS
        window_end = window_start + window_days * DAY_MS
        seen = (legit.time_ms >= window_start) & (legit.time_ms < window_end)
        if not seen.any():
            continue
        visits = np.bincount(legit.merchant[seen], minlength=len(world.merchant_kind)).astype(float)
        merchant = int(rng.choice(len(visits), p=visits / visits.sum()))
        seen_there = np.unique(legit.card[seen & (legit.merchant == merchant)])
        abused = seen_there[rng.random(len(seen_there)) < 0.5][: victims - total]
        if len(abused) == 0:
            continue
        breached.append(merchant)
        cards.append(abused)
        total += len(abused)
        # The ring cashes out one to ten days after the window (sooner when the world ends first).
        room = world.period_ms - window_end
        abuse_start.append(window_end + rng.integers(min(DAY_MS, room // 2), min(10 * DAY_MS, room) + 1,
                                                     len(abused)))
    if not cards:
        return nothing
    num_breaches = len(cards)
    card = np.concatenate(cards)
    start = np.concatenate(abuse_start)
    sizes = rng.integers(1, 5, len(card))
    incident = np.repeat(np.arange(len(card)), sizes)
    ring = np.repeat(np.arange(num_breaches), [len(c) for c in cards])[incident]
    # One ring per breach: a home city, three devices and three IPs shared across its cards.
    ring_city = rng.integers(0, len(_CITIES), num_breaches)
    pick = rng.integers(0, 3, len(incident))
    rows_card = card[incident]
    rows = _fraud_rows(
        rng, world, card=rows_card, time_ms=start[incident] + _offsets_within(rng, sizes, 2.0 * HOUR_MS),
        merchant=rng.choice(_merchants_with(world, _CASHOUT_MCCS, _ONLINE), len(incident)),
        city=ring_city[ring],
        device=_random_ids(rng, 3 * num_breaches, "dev_").reshape(num_breaches, 3)[ring, pick],
        ip=_random_ips(rng, 3 * num_breaches).reshape(num_breaches, 3)[ring, pick],
        amount_minor=np.round(card_mean[rows_card] * rng.uniform(2.0, 8.0, len(incident))),
        incident=incident, pattern=FraudPattern.COMPROMISED_MERCHANT,
    )
    return rows, np.array(breached, dtype=np.int64)


def _no_rows(pattern: FraudPattern) -> _Rows:
    def empty(dtype: type) -> np.ndarray:
        return np.empty(0, dtype=dtype)

    return _Rows(card=empty(np.int64), time_ms=empty(np.int64), merchant=empty(np.int64),
                 channel=empty(np.int8), latitude=empty(np.float64), longitude=empty(np.float64),
                 country=empty(np.int64), device_id=empty(object), ip_address=empty(object),
                 amount_minor=empty(np.int64), reported_ms=empty(np.int64), pattern=pattern)


def _large_amount(rng: np.random.Generator, world: _World, legit: _Rows, card_mean: np.ndarray,
                  incidents: int) -> _Rows:
    sizes = rng.choice([1, 2, 3], incidents, p=[0.6, 0.25, 0.15])
    incident = np.repeat(np.arange(incidents), sizes)
    # Victims with some history, so that "large" means large for that card.
    history = np.bincount(legit.card, minlength=len(world.card_rate))
    eligible = np.flatnonzero(history >= 3)
    card = rng.choice(eligible if len(eligible) else np.arange(len(world.card_rate)), incidents)
    start = rng.integers(0, world.period_ms - 6 * HOUR_MS, incidents)
    # Mostly electronics or jewelry, at a shop (counterfeit card) or online (stolen details).
    risky = np.flatnonzero(np.isin(world.merchant_mcc, ("5732", "5944")))
    anywhere = np.flatnonzero(world.merchant_kind != _ATM)
    merchant = np.where(rng.random(len(incident)) < 0.7, rng.choice(risky if len(risky) else anywhere,
                                                                      len(incident)),
                        rng.choice(anywhere, len(incident)))
    rows_card = card[incident]
    return _fraud_rows(
        rng, world, card=rows_card, time_ms=start[incident] + _offsets_within(rng, sizes, HOUR_MS),
        merchant=merchant, city=rng.integers(0, len(_CITIES), incidents)[incident],
        device=_random_ids(rng, incidents, "dev_")[incident], ip=_random_ips(rng, incidents)[incident],
        amount_minor=np.round(card_mean[rows_card] * rng.uniform(5.0, 20.0, len(incident))),
        incident=incident, pattern=FraudPattern.LARGE_AMOUNT,
        card_present=world.merchant_kind[merchant] == _LOCAL,
    )


def _assemble(world: _World, parts: list[_Rows], start_time_ms: int,
              breached: np.ndarray) -> SimulatedWorld:
    def join(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    pattern = np.concatenate([np.full(len(p.card), p.pattern, dtype=np.int8) for p in parts])
    time_ms = join("time_ms")
    order = np.argsort(time_ms, kind="stable")
    card = join("card")[order]
    customer = world.card_customer[card]
    merchant = join("merchant")[order]
    reported = join("reported_ms")[order]
    num_customers = len(world.customer_city)
    customer_ids = np.where(world.customer_known, _id_strings("cust_", num_customers, 6), "").astype(object)
    merchant_ids = _id_strings("m_", len(world.merchant_kind), 5)
    history = History(
        transaction_id=_id_strings("t_", len(order), 8),
        card_id=_id_strings("card_", len(world.card_rate), 6)[card],
        customer_id=customer_ids[customer],
        merchant_id=merchant_ids[merchant],
        merchant_category=world.merchant_mcc[merchant],
        amount_minor=join("amount_minor")[order],
        currency=np.array(world.currencies, dtype=object)[world.card_currency[card]],
        event_time_ms=time_ms[order] + start_time_ms,
        channel=join("channel")[order],
        country=np.array(world.countries, dtype=object)[join("country")[order]],
        latitude=join("latitude")[order],
        longitude=join("longitude")[order],
        device_id=join("device_id")[order],
        ip_address=join("ip_address")[order],
        is_fraud=(pattern[order] != FraudPattern.NONE).astype(np.int8),
        fraud_reported_time_ms=np.where(reported >= 0, reported + start_time_ms, -1),
        received_time_ms=np.full(len(order), -1, dtype=np.int64),  # arrived in event order
    )
    return SimulatedWorld(history, pattern[order], merchant_ids[breached])
