"""Limits of a real server over real channels: calls past FRAUDSCORE_MAX_CONCURRENT_RPCS refused by
gRPC itself before any handler, and connections aged out (FRAUDSCORE_MAX_CONNECTION_AGE_S)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from tests.conftest import ServerProcess, start_server
from tests.e2e.helpers import scrape, txn, value

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("limits"), model_dir=None,
                       extra_env={"FRAUDSCORE_MAX_CONCURRENT_RPCS": "2"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def aging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("aging"), model_dir=None, extra_env={
        "FRAUDSCORE_MAX_CONNECTION_AGE_S": "1", "FRAUDSCORE_SHUTDOWN_GRACE_S": "1"})
    yield srv
    srv.stop()


def test_calls_past_the_call_limit_are_refused_by_grpc_at_once(limited: ServerProcess) -> None:
    release = threading.Event()

    def held() -> Iterator[pb.ScoreRequest]:
        yield pb.ScoreRequest(transaction=txn())
        release.wait(20)

    before = scrape(limited)
    with grpc.insecure_channel(limited.target) as ch:
        stub = pb_grpc.FraudScoringStub(ch)
        streams = [stub.ScoreStream(held(), timeout=30) for _ in range(2)]
        try:
            for stream in streams:
                next(stream)  # answered: the stream is in the server, holding its slot
            assert value(scrape(limited), "fraudscore_calls_in_flight") == 2
            assert value(scrape(limited), "fraudscore_calls_in_flight_limit") == 2
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10)
            assert time.monotonic() - started < 1.0  # refused at once, not held until the deadline
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            release.set()
        for stream in streams:
            assert list(stream) == []
        stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10)  # slots free again
    after = scrape(limited)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Refused by gRPC before any handler ran: no handler counted it, nothing was recorded.
    assert delta("fraudscore_requests_total", method="Score", code="RESOURCE_EXHAUSTED") == 0
    assert delta("fraudscore_requests_total", method="Score", code="OK") == 1
    assert value(after, "fraudscore_calls_in_flight") == 0
    # Each streamed message's latency, not only the streams' lifetimes.
    assert delta("fraudscore_stream_message_duration_seconds_count") == 2
    assert delta("fraudscore_requests_total", method="ScoreStream", code="OK") == 2


def test_connections_are_aged_out_so_new_pods_get_traffic(aging: ServerProcess) -> None:
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(aging.target) as ch:
        ch.subscribe(states.append, try_to_connect=False)
        stub = pb_grpc.FraudScoringStub(ch)
        stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10)
        assert grpc.ChannelConnectivity.READY in states
        ready_at = states.index(grpc.ChannelConnectivity.READY)
        deadline = time.monotonic() + 10
        while grpc.ChannelConnectivity.IDLE not in states[ready_at:]:  # GOAWAY after ~1 s (±10 %)
            assert time.monotonic() < deadline, f"the connection was not aged out: {states}"
            time.sleep(0.05)
        stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10)  # a new connection, transparently
        ch.unsubscribe(states.append)



def test_a_stream_ends_unavailable_when_its_connection_ages_out(aging: ServerProcess) -> None:
    """README: a ScoreStream lasts at most FRAUDSCORE_MAX_CONNECTION_AGE_S plus the drain grace;
    the client reopens it on UNAVAILABLE (resending unanswered messages is safe: idempotency)."""
    release = threading.Event()

    def held() -> Iterator[pb.ScoreRequest]:
        yield pb.ScoreRequest(transaction=txn())
        release.wait(20)

    with grpc.insecure_channel(aging.target) as ch:
        stream = pb_grpc.FraudScoringStub(ch).ScoreStream(held(), timeout=20)
        try:
            next(stream)
            with pytest.raises(grpc.RpcError) as ended:
                list(stream)
        finally:
            release.set()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
