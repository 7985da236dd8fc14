"""Pop cost with `rate_limit` on vs off (see bench/perf_flow_common.py for how to run it)."""

from __future__ import annotations

from bench.perf_flow_common import fresh_queue, pop_costs_us, report, seed, setup


def main() -> None:
    args = setup("perf_flow_rate")
    rows = []
    for size in (2_000,) if args.quick else (2_000, 20_000):
        fresh_queue("flow-plain")
        seed("flow-plain", size, lambda n: {"n": n})
        # A rate the bench never reaches: the window's bookkeeping is the cost measured.
        fresh_queue("flow-rate", rate_limit="100000/s")
        seed("flow-rate", size, lambda n: {"n": n})
        plain, cost = pop_costs_us(["flow-plain", "flow-rate"], args.pops)
        rows += [("plain", size, plain, plain), ("rate_limit 100000/s", size, cost, plain)]
    report(rows)


if __name__ == "__main__":
    main()
