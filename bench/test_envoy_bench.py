"""What envoy_bench.py decides without running Envoy: whether a run can judge the targets, the
twins `--compare` adds, and when a configuration's idempotency table is full. Run by `./build.sh test` (python3 -m unittest)."""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import envoy_bench as eb  # noqa: E402


def row(name, median, middle=None):
    low, high = middle or (median * 0.98, median * 1.02)
    return {"name": name, "median": median, "min": low, "max": high, "middle": (low, high)}


# Medians of 73096ea's run, a run on a quiet machine: every replay below its plugin.
QUIET = [row("bare", 46.2), row("empty wasm", 52.7), row("rate_limit", 66.9),
         row("replay rate_limit", 61.5), row("flag_router", 68.1), row("replay flag_router", 57.4),
         row("bare POST", 52.1), row("idempotency POST", 93.2),
         row("replay idempotency POST", 77.9), row("bare mix", 47.5), row("edge.wasm", 104.8),
         row("replay edge.wasm", 78.6)]


class RunProblems(unittest.TestCase):
    def test_a_quiet_run_is_judged(self):
        self.assertEqual(eb.run_problems(QUIET), [])

    def test_a_replay_dearer_than_its_plugin_stops_the_judging(self):
        rows = [r for r in QUIET if r["name"] != "replay rate_limit"] + [row("replay rate_limit", 67.0)]
        problems = eb.run_problems(rows)
        self.assertEqual(len(problems), 1)
        self.assertIn("replay rate_limit (67.0 µs) cost more than rate_limit (66.9 µs)", problems[0])

    def test_a_wide_middle_of_bare_rounds_stops_it_and_one_slow_round_does_not(self):
        slow_round = [row("bare", 46.2, (45.9, 46.6)) | {"max": 84.3}] + QUIET[1:]
        self.assertEqual(eb.run_problems(slow_round), [])
        wide = [row("bare", 46.2, (40.0, 50.0))] + QUIET[1:]
        self.assertIn("middle half of bare's rounds", " ".join(eb.run_problems(wide)))


class Compared(unittest.TestCase):
    def test_each_plugin_configuration_gets_a_twin_with_the_other_modules(self):
        ours = eb.configurations("/ours", "/empty.wasm")
        theirs = eb.configurations("/theirs", "/empty.wasm")
        out = eb.with_compared(ours, theirs)
        names = [c[0] for c in out]
        for name in eb.PLUGIN_CONFIGS_MEASURED:
            at = names.index(name)
            self.assertEqual(names[at + 1], f"{name} (compared)")
            self.assertEqual(out[at + 1][2], theirs[[c[0] for c in theirs].index(name)][2])
            self.assertEqual(out[at + 1][3], out[at][3], "the same requests")
        for reference in ("bare", "empty wasm", "bare POST", "bare mix", "4 empty wasm"):
            self.assertNotIn(f"{reference} (compared)", names)
        self.assertEqual(eb.FLOOR_OF["idempotency POST (compared)"], "bare POST")


class FakeTable:
    """An Envoy whose idempotency table of `slots` records evicts once every slot is taken:
    `wrk` sends `per_batch` fresh POSTs into it."""

    def __init__(self, slots, per_batch):
        self.slots, self.per_batch, self.held, self.evicted, self.port = slots, per_batch, 0, 0, 0

    def counter(self, name):
        self.test_name = name
        return self.evicted

    def post(self):
        for _ in range(self.per_batch):
            if self.held < self.slots:
                self.held += 1
            else:
                self.evicted += 1
        return {"requests": self.per_batch}


class Fill(unittest.TestCase):
    def run_fill(self, table):
        real = eb.wrk
        eb.wrk = lambda *_args, **_kw: table.post()
        try:
            return eb.fill(table, "fill.lua", 16)
        finally:
            eb.wrk = real

    def test_fills_until_a_whole_batch_of_claims_evicts(self):
        table = FakeTable(slots=100_000, per_batch=30_000)
        sent, share = self.run_fill(table)
        self.assertEqual(table.held, 100_000, "every slot holds a record")
        self.assertEqual(share, 1.0)
        # Batches 1-3 fill 90,000 slots, the 4th fills the rest and evicts 20,000 (2/3): the
        # 5th evicts on every claim and ends the fill.
        self.assertEqual(sent, 150_000)
        self.assertEqual(table.test_name, "wasmcustom.idempotency.evicted")

    def test_a_table_that_never_fills_stops_at_the_limit(self):
        table = FakeTable(slots=10**9, per_batch=100_000)
        sent, share = self.run_fill(table)
        self.assertEqual(sent, eb.FILL_LIMIT)
        self.assertEqual(share, 0.0)


if __name__ == "__main__":
    unittest.main()
