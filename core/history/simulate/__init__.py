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

The room: world.py (what exists before the first transaction), legit.py (legitimate behaviour),
fraud.py (the four patterns), simulator.py (the stages in order, and assembly). Offline: may
import numpy and core.history.table; nothing on the request path imports it.
"""

from core.history.simulate.simulator import SimulatedWorld, simulate, simulate_world
from core.history.simulate.world import FraudPattern

__all__ = ["FraudPattern", "SimulatedWorld", "simulate", "simulate_world"]
