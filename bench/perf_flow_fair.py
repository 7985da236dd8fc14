"""Pop cost with `fair_key` on vs off as the number of values grows to 10,000 (see
bench/perf_flow_common.py to run it): the cost per pop should stay flat."""

from __future__ import annotations

from bench.perf_flow_common import fresh_queue, pop_costs_us, report, seed, setup


def main() -> None:
    args = setup("perf_flow_fair")
    size = 5_000 if args.quick else 30_000
    fresh_queue("flow-plain")
    seed("flow-plain", size, lambda n: {"org": n})
    ids = ["flow-plain"]
    for values in (10, 1_000, 10_000):
        fresh_queue(f"flow-fair-{values}", fair_key="org")
        # One value holds half the queue (the skewed case); the rest spread over the others.
        seed(f"flow-fair-{values}", size, lambda n, v=values: {"org": "big" if n % 2 else n % v})
        ids.append(f"flow-fair-{values}")
    plain, *costs = pop_costs_us(ids, args.pops)
    rows = [("plain", size, plain, plain)]
    for values, cost in zip((10, 1_000, 10_000), costs, strict=True):
        rows.append((f"fair_key, {values} values", size, cost, plain))
    report(rows)


if __name__ == "__main__":
    main()
