"""The four fraud patterns, injected on top of legitimate traffic (`FraudPattern`): card testing,
account takeover, a compromised merchant's cards abused by one ring, and large amounts. Every
fraud is reported: its incident's last transaction plus 1 to 30 days, lognormal around 5 days."""

from __future__ import annotations

import numpy as np

from core.history.simulate.world import (
    ATM,
    CASHOUT_MCCS,
    CITIES,
    DAY_MS,
    FAR_KM,
    HOUR_MS,
    LOCAL,
    MINUTE_MS,
    ONLINE,
    TESTING_MCCS,
    FraudPattern,
    Rows,
    World,
    distance_km,
    no_rows,
    random_ids,
    random_ips,
)
from core.history.table import Channel

# Incidence per card and day at fraud_scale=1, chosen for about 1% fraud overall.
CARD_TESTING_PER_CARD_DAY = 2.5e-4
TAKEOVER_PER_CARD_DAY = 5e-4
LARGE_AMOUNT_PER_CARD_DAY = 1.2e-3
BREACH_VICTIMS_PER_CARD_DAY = 1.6e-3  # cards abused after a merchant breach


def incidents(rng: np.random.Generator, expected: float) -> int:
    # At least one of each pattern, so that a small world still shows all four.
    return max(1, int(rng.poisson(expected)))


def _offsets_within(rng: np.random.Generator, sizes: np.ndarray, mean_gap_ms: float) -> np.ndarray:
    """Per row: the time since its incident's first row, exponential gaps between rows."""
    gaps = rng.exponential(mean_gap_ms, int(sizes.sum()))
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    gaps[starts == np.arange(len(gaps))] = 0.0
    running = np.cumsum(gaps)
    offsets: np.ndarray = (running - running[starts]).astype(np.int64)
    return offsets


def _merchants_with(world: World, mccs: tuple[str, ...], kind: int) -> np.ndarray:
    chosen = np.flatnonzero(np.isin(world.merchant_mcc, mccs) & (world.merchant_kind == kind))
    return chosen if len(chosen) else np.flatnonzero(world.merchant_kind == kind)


def _far_city(rng: np.random.Generator, world: World, home_city: np.ndarray) -> np.ndarray:
    """A city at least FAR_KM from each home city, uniformly among those."""
    distance = distance_km(world.city_lat[:, None], world.city_lon[:, None], world.city_lat, world.city_lon)
    far = distance[home_city] >= FAR_KM
    # Random keys, masked to the far cities: the argmax is a uniform choice among them.
    city: np.ndarray = np.argmax(np.where(far, rng.random(far.shape), -1.0), axis=1)
    return city


def _fraud_rows(rng: np.random.Generator, world: World, *, card: np.ndarray, time_ms: np.ndarray,
                merchant: np.ndarray, city: np.ndarray, device: np.ndarray, ip: np.ndarray,
                amount_minor: np.ndarray, incident: np.ndarray, pattern: FraudPattern,
                card_present: np.ndarray | None = None) -> Rows:
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
    return Rows(card, time_ms, merchant, channel, latitude, longitude, country,
                 np.where(present, "", device).astype(object), np.where(present, "", ip).astype(object),
                 np.maximum(1, amount_minor).astype(np.int64), reported[incident], pattern)


def card_testing(rng: np.random.Generator, world: World, bursts: int) -> Rows:
    sizes = rng.integers(5, 31, bursts)
    incident = np.repeat(np.arange(bursts), sizes)
    start = rng.integers(0, world.period_ms - HOUR_MS, bursts)
    time_ms = start[incident] + _offsets_within(rng, sizes, 20_000.0)
    # Each burst tries one to three cheap digital-goods merchants the card never used.
    shops = _merchants_with(world, TESTING_MCCS, ONLINE)
    burst_shops = rng.choice(shops, (bursts, 3))
    used = rng.integers(0, rng.integers(1, 4, bursts)[incident])
    card = rng.integers(0, len(world.card_rate), bursts)
    city = rng.integers(0, len(CITIES), bursts)
    return _fraud_rows(
        rng, world, card=card[incident], time_ms=time_ms, merchant=burst_shops[incident, used],
        city=city[incident], device=random_ids(rng, bursts, "dev_")[incident],
        ip=random_ips(rng, bursts)[incident], amount_minor=rng.integers(100, 501, len(incident)),
        incident=incident, pattern=FraudPattern.CARD_TESTING,
    )


def account_takeover(rng: np.random.Generator, world: World, card_mean: np.ndarray, takeovers: int) -> Rows:
    sizes = rng.integers(3, 11, takeovers)
    incident = np.repeat(np.arange(takeovers), sizes)
    card = rng.integers(0, len(world.card_rate), takeovers)
    start = rng.integers(0, world.period_ms - 12 * HOUR_MS, takeovers)
    city = _far_city(rng, world, world.customer_city[world.card_customer[card]])
    shops = _merchants_with(world, CASHOUT_MCCS, ONLINE)
    rows_card = card[incident]
    return _fraud_rows(
        rng, world, card=rows_card, time_ms=start[incident] + _offsets_within(rng, sizes, 30.0 * MINUTE_MS),
        merchant=rng.choice(shops, len(incident)), city=city[incident],
        device=random_ids(rng, takeovers, "dev_")[incident], ip=random_ips(rng, takeovers)[incident],
        amount_minor=np.round(card_mean[rows_card] * rng.uniform(1.5, 5.0, len(incident))),
        incident=incident, pattern=FraudPattern.ACCOUNT_TAKEOVER,
    )


def compromised_merchant(rng: np.random.Generator, world: World, legit: Rows, card_mean: np.ndarray,
                          victims: int) -> tuple[Rows, np.ndarray]:
    """Breach busy merchants until about `victims` cards seen there are abused online days later.

    Counting victims rather than breaches keeps this pattern's share steady from seed to
    seed, whatever the popularity of the merchants that happen to be breached.
    """
    window_days = int(np.clip(world.num_days // 5, 1, 5))
    nothing = (no_rows(FraudPattern.COMPROMISED_MERCHANT), np.empty(0, dtype=np.int64))
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
    ring_city = rng.integers(0, len(CITIES), num_breaches)
    pick = rng.integers(0, 3, len(incident))
    rows_card = card[incident]
    rows = _fraud_rows(
        rng, world, card=rows_card, time_ms=start[incident] + _offsets_within(rng, sizes, 2.0 * HOUR_MS),
        merchant=rng.choice(_merchants_with(world, CASHOUT_MCCS, ONLINE), len(incident)),
        city=ring_city[ring],
        device=random_ids(rng, 3 * num_breaches, "dev_").reshape(num_breaches, 3)[ring, pick],
        ip=random_ips(rng, 3 * num_breaches).reshape(num_breaches, 3)[ring, pick],
        amount_minor=np.round(card_mean[rows_card] * rng.uniform(2.0, 8.0, len(incident))),
        incident=incident, pattern=FraudPattern.COMPROMISED_MERCHANT,
    )
    return rows, np.array(breached, dtype=np.int64)


def large_amount(rng: np.random.Generator, world: World, legit: Rows, card_mean: np.ndarray,
                  incidents: int) -> Rows:
    sizes = rng.choice([1, 2, 3], incidents, p=[0.6, 0.25, 0.15])
    incident = np.repeat(np.arange(incidents), sizes)
    # Victims with some history, so that "large" means large for that card.
    history = np.bincount(legit.card, minlength=len(world.card_rate))
    eligible = np.flatnonzero(history >= 3)
    card = rng.choice(eligible if len(eligible) else np.arange(len(world.card_rate)), incidents)
    start = rng.integers(0, world.period_ms - 6 * HOUR_MS, incidents)
    # Mostly electronics or jewelry, at a shop (counterfeit card) or online (stolen details).
    risky = np.flatnonzero(np.isin(world.merchant_mcc, ("5732", "5944")))
    anywhere = np.flatnonzero(world.merchant_kind != ATM)
    merchant = np.where(rng.random(len(incident)) < 0.7, rng.choice(risky if len(risky) else anywhere,
                                                                      len(incident)),
                        rng.choice(anywhere, len(incident)))
    rows_card = card[incident]
    return _fraud_rows(
        rng, world, card=rows_card, time_ms=start[incident] + _offsets_within(rng, sizes, HOUR_MS),
        merchant=merchant, city=rng.integers(0, len(CITIES), incidents)[incident],
        device=random_ids(rng, incidents, "dev_")[incident], ip=random_ips(rng, incidents)[incident],
        amount_minor=np.round(card_mean[rows_card] * rng.uniform(5.0, 20.0, len(incident))),
        incident=incident, pattern=FraudPattern.LARGE_AMOUNT,
        card_present=world.merchant_kind[merchant] == LOCAL,
    )


