"""Pop cost with `concurrency_key` on vs off (see bench/perf_flow_common.py to run it): values
with room, and a head of the queue crowded by one value at its limit."""

from __future__ import annotations

from bench.perf_flow_common import fresh_queue, pop_costs_us, report, seed, setup


def main() -> None:
    args = setup("perf_flow_concurrency")
    rows = []
    for size in (2_000,) if args.quick else (2_000, 20_000):
        fresh_queue("flow-plain")
        seed("flow-plain", size, lambda n: {"org": n % 100})
        fresh_queue("flow-conc", concurrency_key="org", concurrency_limit=1000)
        seed("flow-conc", size, lambda n: {"org": n % 100})
        # Half the queue is one value held at its limit of 1, at the head (priority 0).
        fresh_queue("flow-crowd", concurrency_key="org", concurrency_limit=1)
        seed("flow-crowd", size, lambda n: {"org": "big" if n % 2 else f"o{n}"})
        plain, room, crowd = pop_costs_us(["flow-plain", "flow-conc", "flow-crowd"], args.pops)
        rows += [
            ("plain", size, plain, plain),
            ("concurrency 100 values, room", size, room, plain),
            ("concurrency, crowded head", size, crowd, plain),
        ]
    report(rows)


if __name__ == "__main__":
    main()
