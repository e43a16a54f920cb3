"""Liveness between the node's clients and workers (HTTP/2 keepalive, job heartbeats): one policy,
read by both ends.

A worker whose machine vanished mid-job without closing the connection (a rented VM preempted, a
network path cut: no FIN, no RST) held a client's call until the job's deadline, 600 s by default.
With these options the client pings every KEEPALIVE_MS and ends the call UNAVAILABLE when a ping
goes unanswered for PING_TIMEOUT_MS, so the client (or the gateway) fails over within ~30 s. The
worker pings its clients alike: the job of a client that vanished is cancelled (and billed for what
it produced) instead of running on to its last token in a slot others wait for.

Pings prove the connection, not the job: a worker that accepted a job and then sent nothing (buggy or
malicious; its pings still answered) held the client until the job's deadline. So a worker sends a
JobProgress event whenever a job has had nothing to send for HEARTBEAT_S (waiting in line, a long
prefill), and a client may give up on a worker silent for longer (WorkerClient.run's idle_timeout_s;
the gateway's idle_timeout_s, 30 s by default).
"""

from __future__ import annotations

KEEPALIVE_MS = 20_000
PING_TIMEOUT_MS = 10_000
# The longest a worker leaves an open job without an event. A node may send them more often
# (`heartbeat_s` in its config), never less: clients' idle timeouts are set above this.
HEARTBEAT_S = 5.0
# How long the gateway and `submit` wait on a silent worker by default: six heartbeats, so a loaded
# worker's slow loop or a congested path is not taken for a silent one.
IDLE_TIMEOUT_S = 30.0


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
            # With keepalive_timeout alone grpcio 1.85 timed out neither the keepalive ping nor a
            # bandwidth probe's ping left unanswered by a frozen path (measured).
            ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_MS),
            # grpc stops pinging after two pings without data of its own (the default): a client
            # sends nothing after its job, and a worker nothing while the job waits in line.
            ("grpc.http2.max_pings_without_data", 0)]


def server_options() -> list[tuple[str, int]]:
    # The same pings towards the clients. And the clients' pings come also while a job waits in line
    # and no data flows: grpc's default (one per 5 min without data, then two strikes) ended such a
    # call with GOAWAY "Too many pings".
    return [*channel_options(), ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2)]
