"""Legitimate behaviour: a daily rhythm in local time; card present at favourite and other shops in
the home (or trip) city, e-commerce from the usual device and IP with some noise, ATM withdrawals."""

from __future__ import annotations

import numpy as np

from core.history.simulate.world import (
    CITIES,
    DAY_MS,
    FAVOURITE_WEIGHTS,
    HOUR_MS,
    HOUR_WEIGHTS,
    FraudPattern,
    Rows,
    World,
    random_ids,
    random_ips,
)
from core.history.table import Channel


def legit_rows(rng: np.random.Generator, world: World) -> Rows:
    card = np.repeat(np.arange(len(world.card_rate)), rng.poisson(world.card_rate * world.num_days))
    n = len(card)
    customer = world.card_customer[card]
    home = world.customer_city[customer]
    hour = rng.choice(24, n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    local_ms = rng.integers(0, world.num_days, n) * DAY_MS + hour * HOUR_MS + rng.integers(0, HOUR_MS, n)
    utc_offset_ms = np.array([c[4] for c in CITIES])[home] * HOUR_MS
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
    slot = np.searchsorted(np.cumsum(FAVOURITE_WEIGHTS), rng.random(int(favourite.sum())) * FAVOURITE_WEIGHTS.sum())
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
    device[new_device] = random_ids(rng, len(new_device), "dev_")
    new_ip = ec_rows[travelling[ec_rows] | (rng.random(len(ec_rows)) < 0.08)]
    ip[new_ip] = random_ips(rng, len(new_ip))

    cents = world.merchant_ticket[merchant] * world.customer_spend[customer] * rng.lognormal(0.0, 0.5, n)
    cents = np.where(atm, 2000.0 * np.maximum(1.0, np.round(cents / 2000.0)), cents)
    # Now and then a genuine splurge, so that a large amount alone does not mean fraud.
    splurge = ~atm & (rng.random(n) < 0.003)
    cents[splurge] *= rng.uniform(4.0, 15.0, int(splurge.sum()))
    amount = np.maximum(1, np.round(cents * world.currency_factor[world.card_currency[card]])).astype(np.int64)
    return Rows(card, time_ms, merchant, channel.astype(np.int8), latitude, longitude, country, device, ip,
                 amount, np.full(n, -1, dtype=np.int64), FraudPattern.NONE)


def card_mean_amount(world: World, legit: Rows) -> np.ndarray:
    """Mean legitimate amount per card in its currency; an estimate for cards without any."""
    num_cards = len(world.card_rate)
    count = np.bincount(legit.card, minlength=num_cards)
    total = np.bincount(legit.card, weights=legit.amount_minor, minlength=num_cards)
    estimate = 4000.0 * world.customer_spend[world.card_customer] * world.currency_factor[world.card_currency]
    mean: np.ndarray = np.where(count > 0, total / np.maximum(count, 1), estimate)
    return mean


