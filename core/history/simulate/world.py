"""The simulated world: its cities, currencies and kinds of merchant, and everything drawn before the
first transaction (`World.build`: merchants, customers, cards, devices, favourites, trips), plus the
rows every behaviour produces (`Rows`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

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


# name, country, latitude, longitude, UTC offset (hours), share of customers and merchants
CITIES = (
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
CURRENCIES = {
    "US": ("USD", 1.0), "CA": ("CAD", 1.36), "GB": ("GBP", 0.79), "FR": ("EUR", 0.92),
    "DE": ("EUR", 0.92), "ES": ("EUR", 0.92), "NL": ("EUR", 0.92), "BR": ("BRL", 5.0),
    "AU": ("AUD", 1.5), "SG": ("SGD", 1.35), "JP": ("JPY", 1.5), "NG": ("NGN", 15.0),
}
LOCAL, ONLINE, ATM = 0, 1, 2
# MCC, kind, share within its kind, typical ticket (US cents), e-commerce share (the rest is
# card present for local merchants, other card-not-present for online ones)
MCCS = (
    ("5411", LOCAL, 10, 4500, 0.03), ("5812", LOCAL, 8, 3500, 0.02), ("5814", LOCAL, 8, 1200, 0.05),
    ("5541", LOCAL, 6, 4500, 0.0), ("5912", LOCAL, 4, 2500, 0.05), ("5311", LOCAL, 3, 7000, 0.25),
    ("5691", LOCAL, 4, 6000, 0.3), ("5732", LOCAL, 2, 25000, 0.3), ("5944", LOCAL, 1, 40000, 0.2),
    ("7011", LOCAL, 2, 18000, 0.5), ("4121", LOCAL, 3, 2200, 0.6),
    ("5999", ONLINE, 6, 4000, 1.0), ("5815", ONLINE, 5, 900, 1.0), ("5967", ONLINE, 2, 3000, 0.7),
    ("4899", ONLINE, 3, 1500, 0.2), ("4511", ONLINE, 2, 40000, 0.9), ("5732", ONLINE, 2, 30000, 1.0),
    ("6011", ATM, 1, 10000, 0.0),
)
TESTING_MCCS = ("5815", "5999", "5967", "4899")  # cheap digital goods: where stolen cards are tried
CASHOUT_MCCS = ("5732", "4511", "5999", "5944")  # resaleable, high-ticket goods
HOUR_WEIGHTS = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.2, 0.5, 1.0, 1.4, 1.5, 1.6, 1.8,
                          2.0, 1.8, 1.6, 1.6, 1.7, 1.9, 2.0, 1.9, 1.6, 1.2, 0.8, 0.5])
FAVOURITE_WEIGHTS = np.array([0.3, 0.22, 0.17, 0.13, 0.1, 0.08])  # per favourite local merchant
FAR_KM = 1500.0  # an account takeover comes from a city at least this far from home

def random_ids(rng: np.random.Generator, n: int, prefix: str) -> np.ndarray:
    # Random rather than sequential, so a fraudster's device cannot be told by its number.
    return np.array([f"{prefix}{x:010x}" for x in rng.integers(0, 2**40, n)], dtype=object)


def random_ips(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.array([f"10.{x >> 16}.{(x >> 8) & 255}.{x & 255}" for x in rng.integers(0, 2**24, n)],
                    dtype=object)


def id_strings(prefix: str, n: int, width: int) -> np.ndarray:
    width = max(width, len(str(max(n - 1, 0))))
    return np.array([f"{prefix}{i:0{width}d}" for i in range(n)], dtype=object)


def distance_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dlat, dlon = p2 - p1, np.radians(lon2 - lon1)
    a = np.sin(dlat / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    result: np.ndarray = 2 * 6371.0 * np.arcsin(np.sqrt(a))
    return result


@dataclass(frozen=True, slots=True)
class GroupedChoice:
    """Weighted draws of a member within a group (a merchant within a city), vectorized."""

    members: np.ndarray  # member indices, sorted by group
    cumulative: np.ndarray  # running sum of weights along `members`
    low: np.ndarray  # per group: the running sum before its first member
    high: np.ndarray  # per group: the running sum after its last member

    @classmethod
    def build(cls, groups: np.ndarray, weights: np.ndarray, num_groups: int, members: np.ndarray) -> GroupedChoice:
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
class World:
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
    local_choice: GroupedChoice  # by city
    atm_choice: GroupedChoice  # by city
    online_choice: GroupedChoice  # one group
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
    favourite_local: np.ndarray  # (num_customers, len(FAVOURITE_WEIGHTS)) merchant indices
    favourite_online: np.ndarray  # (num_customers, 3)

    @property
    def period_ms(self) -> int:
        return self.num_days * DAY_MS

    @classmethod
    def build(cls, rng: np.random.Generator, num_cards: int, num_merchants: int, num_days: int) -> World:
        num_cities = len(CITIES)
        city_weight = np.array([c[5] for c in CITIES], dtype=float)
        city_weight /= city_weight.sum()
        countries = tuple(dict.fromkeys(c[1] for c in CITIES))
        city_country = np.array([countries.index(c[1]) for c in CITIES])
        city_lat = np.array([c[2] for c in CITIES])
        city_lon = np.array([c[3] for c in CITIES])
        currencies = tuple(dict.fromkeys(v[0] for v in CURRENCIES.values()))
        country_currency = np.array([currencies.index(CURRENCIES[c][0]) for c in countries])
        currency_factor = np.array([next(v[1] for v in CURRENCIES.values() if v[0] == cur) for cur in currencies])

        # Merchants: ATMs and local shops get one per city first so no city is without them.
        num_atm = max(num_cities, round(0.06 * num_merchants))
        num_online = round(0.24 * num_merchants)
        num_local = num_merchants - num_atm - num_online
        kind = np.repeat([LOCAL, ONLINE, ATM], [num_local, num_online, num_atm])
        mcc_kind = np.array([m[1] for m in MCCS])
        mcc_share = np.array([m[2] for m in MCCS], dtype=float)
        mcc = np.empty(num_merchants, dtype=np.int64)
        city = np.empty(num_merchants, dtype=np.int64)
        for k, count in ((LOCAL, num_local), (ONLINE, num_online), (ATM, num_atm)):
            options = np.flatnonzero(mcc_kind == k)
            mcc[kind == k] = rng.choice(options, count, p=mcc_share[options] / mcc_share[options].sum())
            # Online shops sit in a random city (their country is used); the others spread first.
            spread = np.arange(count) if k != ONLINE else np.full(count, num_cities)
            city[kind == k] = np.where(spread < num_cities, spread, rng.choice(num_cities, count, p=city_weight))
        ticket = np.array([m[3] for m in MCCS], dtype=float)[mcc] * rng.lognormal(0.0, 0.4, num_merchants)
        popularity = rng.lognormal(0.0, 1.0, num_merchants)
        index = np.arange(num_merchants)
        local, atm, online = kind == LOCAL, kind == ATM, kind == ONLINE

        # Customers: mostly one card each, some two.
        cards_per_customer = np.where(rng.random(num_cards) < 0.15, 2, 1)
        num_customers = int(np.searchsorted(np.cumsum(cards_per_customer), num_cards) + 1)
        card_customer = np.repeat(np.arange(num_customers), cards_per_customer[:num_customers])[:num_cards]
        customer_city = rng.choice(num_cities, num_customers, p=city_weight)
        devices = random_ids(rng, 2 * num_customers, "dev_").reshape(num_customers, 2)
        one_device = rng.random(num_customers) < 0.6
        devices[one_device, 1] = devices[one_device, 0]
        favourite_local = GroupedChoice.build(city[local], popularity[local], num_cities, index[local]).draw(
            rng, np.repeat(customer_city, len(FAVOURITE_WEIGHTS))).reshape(num_customers, -1)
        online_choice = GroupedChoice.build(np.zeros(online.sum(), dtype=np.int64), popularity[online], 1,
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
            merchant_mcc=np.array([m[0] for m in MCCS], dtype=object)[mcc], merchant_city=city,
            merchant_lat=city_lat[city] + rng.normal(0, 0.04, num_merchants),
            merchant_lon=city_lon[city] + rng.normal(0, 0.04, num_merchants),
            merchant_ticket=ticket, merchant_ec_share=np.array([m[4] for m in MCCS])[mcc],
            local_choice=GroupedChoice.build(city[local], popularity[local], num_cities, index[local]),
            atm_choice=GroupedChoice.build(city[atm], popularity[atm], num_cities, index[atm]),
            online_choice=online_choice,
            card_customer=card_customer, card_rate=rng.lognormal(rate_mu, 0.6, num_cards),
            card_currency=country_currency[city_country[customer_city[card_customer]]],
            currencies=currencies, currency_factor=currency_factor, card_trip=trip,
            customer_known=rng.random(num_customers) >= 0.03, customer_city=customer_city,
            customer_lat=city_lat[customer_city] + rng.normal(0, 0.05, num_customers),
            customer_lon=city_lon[customer_city] + rng.normal(0, 0.05, num_customers),
            customer_spend=rng.lognormal(0.0, 0.5, num_customers),
            customer_online_share=rng.beta(2.0, 6.0, num_customers), customer_devices=devices,
            customer_ip=random_ips(rng, num_customers), favourite_local=favourite_local,
            favourite_online=favourite_online.reshape(num_customers, 3),
        )


@dataclass(frozen=True, slots=True)
class Rows:
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


def no_rows(pattern: FraudPattern) -> Rows:
    def empty(dtype: type) -> np.ndarray:
        return np.empty(0, dtype=dtype)

    return Rows(card=empty(np.int64), time_ms=empty(np.int64), merchant=empty(np.int64),
                 channel=empty(np.int8), latitude=empty(np.float64), longitude=empty(np.float64),
                 country=empty(np.int64), device_id=empty(object), ip_address=empty(object),
                 amount_minor=empty(np.int64), reported_ms=empty(np.int64), pattern=pattern)


