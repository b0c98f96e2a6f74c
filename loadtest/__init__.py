"""Load tests: a locust file for the FraudScoring API (loopback targets only)."""
