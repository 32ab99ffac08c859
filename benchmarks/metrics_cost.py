"""`python -m benchmarks.metrics_cost`: what `mdp-broker --metrics-bind` costs the broker.

The same throughput scenario (8 clients x 4 echo workers, synchronous, 64 B) runs against our
broker without metrics and with `--metrics-bind`, alternating, `--repeat` times each, in one
process so both see the same machine. While the metrics broker runs, `/metrics` is scraped every
`--scrape-interval` seconds (1 s: fifteen times harsher than Prometheus' default), so the cost
of the collector, which runs in the broker process, is counted too. It prints the broker's CPU
per 1,000 requests for each run, the medians, and their ratio (target: <= 1.05).

    python -m benchmarks.metrics_cost                 # 5 + 5 runs of 24,000 requests
    python -m benchmarks.metrics_cost --repeat 3 --requests 12000
"""

from __future__ import annotations

import argparse
import statistics
import threading
import urllib.request

from benchmarks.brokers import free_port, start_broker
from benchmarks.loadgen import NATIVE_DIALECT, Scenario, run_throughput


def _scrape_until(port: int, stop: threading.Event, interval: float) -> int:
    scrapes = 0
    while not stop.wait(interval):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                answer.read()
            scrapes += 1
        except OSError:
            pass
    return scrapes


def run_once(scenario: Scenario, metrics: bool, interval: float) -> float:
    """One run; the broker's CPU milliseconds per 1,000 requests."""
    port = free_port()
    extra = ["--metrics-bind", f"127.0.0.1:{port}"] if metrics else []
    broker = start_broker("ours", extra_args=extra)
    stop = threading.Event()
    scraper = None
    if metrics:
        scraper = threading.Thread(target=_scrape_until, args=(port, stop, interval), daemon=True)
        scraper.start()
    try:
        result = run_throughput(broker, NATIVE_DIALECT["ours"], scenario)
    finally:
        stop.set()
        if scraper is not None:
            scraper.join(10)
        broker.stop()
    if result.lost or result.bad:
        raise RuntimeError(f"run lost {result.lost} and got {result.bad} bad replies")
    return result.cpu_ms_per_1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_cost", description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=24_000)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    args = parser.parse_args()
    scenario = Scenario("8x4 sync 64 B", 8, 4, 1, 64, args.requests)
    off: list[float] = []
    on: list[float] = []
    for rep in range(args.repeat):
        # Alternate which goes first, so a drift of the machine's load hits both alike.
        for metrics in (False, True) if rep % 2 == 0 else (True, False):
            cost = run_once(scenario, metrics, args.scrape_interval)
            (on if metrics else off).append(cost)
            label = "metrics on " if metrics else "metrics off"
            print(f"rep {rep + 1} {label}: {cost:.1f} ms CPU per 1000 requests", flush=True)
    ratio = statistics.median(on) / statistics.median(off)
    print(
        f"median CPU per 1000 requests: off {statistics.median(off):.1f} ms, "
        f"on {statistics.median(on):.1f} ms; on/off = {ratio:.3f} (target <= 1.05)"
    )


if __name__ == "__main__":
    main()
