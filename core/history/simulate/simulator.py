"""Running a simulation: the stages in order, each from its own child of one SeedSequence (so a seed
gives the same arrays bit for bit), and the rows assembled into a `History` sorted by time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.history.simulate.fraud import (
    BREACH_VICTIMS_PER_CARD_DAY,
    CARD_TESTING_PER_CARD_DAY,
    LARGE_AMOUNT_PER_CARD_DAY,
    TAKEOVER_PER_CARD_DAY,
    account_takeover,
    card_testing,
    compromised_merchant,
    incidents,
    large_amount,
)
from core.history.simulate.legit import card_mean_amount, legit_rows
from core.history.simulate.world import CITIES, FraudPattern, Rows, World, id_strings
from core.history.table import History


@dataclass(frozen=True, slots=True, eq=False)
class SimulatedWorld:
    """A simulated history with the ground truth behind its labels."""

    history: History
    fraud_pattern: np.ndarray  # int8 FraudPattern per row of `history`
    breached_merchant_ids: np.ndarray  # object array: merchants breached by COMPROMISED_MERCHANT



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
    world = World.build(rngs[0], num_cards, num_merchants, num_days)
    step("world")
    legit = legit_rows(rngs[1], world)
    card_mean = card_mean_amount(world, legit)
    step("legitimate")
    parts = [legit]
    if fraud_scale > 0:
        card_days = num_cards * num_days * fraud_scale
        parts.append(card_testing(rngs[2], world, incidents(rngs[2], CARD_TESTING_PER_CARD_DAY * card_days)))
        step("card testing")
        parts.append(account_takeover(rngs[3], world, card_mean,
                                       incidents(rngs[3], TAKEOVER_PER_CARD_DAY * card_days)))
        step("account takeover")
        victims = incidents(rngs[4], BREACH_VICTIMS_PER_CARD_DAY * card_days)
        cm_rows, breached = compromised_merchant(rngs[4], world, legit, card_mean, victims)
        parts.append(cm_rows)
        step("compromised merchant")
        parts.append(large_amount(rngs[5], world, legit, card_mean,
                                   incidents(rngs[5], LARGE_AMOUNT_PER_CARD_DAY * card_days)))
        step("large amount")
    else:
        breached = np.empty(0, dtype=np.int64)
    result = assemble(world, parts, start_time_ms, breached)
    step("assemble")
    return result


def _check_arguments(num_days: int, num_cards: int, num_merchants: int, fraud_scale: float) -> None:
    if num_days < 1:
        raise ValueError(f"num_days: expected at least 1, got {num_days}")
    if num_cards < 10:
        raise ValueError(f"num_cards: expected at least 10, got {num_cards}")
    if num_merchants < 4 * len(CITIES):
        raise ValueError(
            f"num_merchants: expected at least {4 * len(CITIES)} so that every one of the "
            f"{len(CITIES)} cities has shops and an ATM, got {num_merchants}"
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


def assemble(world: World, parts: list[Rows], start_time_ms: int,
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
    customer_ids = np.where(world.customer_known, id_strings("cust_", num_customers, 6), "").astype(object)
    merchant_ids = id_strings("m_", len(world.merchant_kind), 5)
    history = History(
        transaction_id=id_strings("t_", len(order), 8),
        card_id=id_strings("card_", len(world.card_rate), 6)[card],
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
