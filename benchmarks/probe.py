"""`python -m benchmarks.probe`: one throughput scenario against one broker, for quick checks
and profiling (`--broker-command` runs the broker under cProfile or py-spy).
"""

from __future__ import annotations

import argparse

from benchmarks.brokers import BROKERS, start_broker
from benchmarks.loadgen import DIALECTS, NATIVE_DIALECT, Scenario, run_throughput


def main() -> None:
    """`python -m benchmarks.loadgen`: one scenario against one broker, printed."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--broker", choices=BROKERS, default="ours")
    parser.add_argument("--dialect", choices=[*DIALECTS, "native"], default="native")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--outstanding", type=int, default=1)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--requests", type=int, default=24_000)
    parser.add_argument("--max-seconds", type=float, default=10.0)
    args = parser.parse_args()
    dialect = NATIVE_DIALECT[args.broker] if args.dialect == "native" else args.dialect
    scenario = Scenario(
        "cli",
        args.clients,
        args.workers,
        args.outstanding,
        args.payload,
        args.requests,
        args.max_seconds,
    )
    broker = start_broker(args.broker)
    try:
        result = run_throughput(broker, dialect, scenario)
    finally:
        broker.stop()
    for name in result.__slots__:  # type: ignore[attr-defined]
        print(f"{name:>16}: {getattr(result, name)}")


if __name__ == "__main__":
    main()
