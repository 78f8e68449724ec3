"""Load-test clients for the recsvc Recommender gRPC service.

    python -m loadtest run --target 127.0.0.1:50051 --duration 10 --concurrency 64
    python -m loadtest run --target 127.0.0.1:50051 --duration 10 --rate 2000 --report r.json
    python -m loadtest stream --target 127.0.0.1:50051 --streams 16 --rate 2000 --duration 10
    python -m loadtest freshness --target 127.0.0.1:50051 --samples 100
    python -m loadtest empty-server --port 50999

Modes: ``run`` (unary calls, closed or open loop), ``stream`` (StreamFeedback),
``freshness`` (feedback -> recommendations), ``empty-server`` (the gRPC ceiling).
Programmatic use: loadtest.run.run_load, loadtest.stream.run_streams,
loadtest.freshness.run_freshness, loadtest.empty_server.start_empty_server.
"""
