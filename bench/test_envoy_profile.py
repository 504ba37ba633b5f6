"""The region comparison of envoy_profile.py, on perf report lines written here."""
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import envoy_profile as ep  # noqa: E402

REPORT = """
     2.00%  [.] 0x0000000006187a16
     1.00%  [.] 0x000000000618ffff
     0.50%  [.] 0x00000000020bdc54
     9.00%  [.] some_named_symbol
"""


class Regions(unittest.TestCase):
    def test_samples_are_summed_per_64k_region_in_us(self):
        r = ep.regions(REPORT, 200.0)
        # 0x6187a16 and 0x618ffff share a region; a named symbol has no address to place.
        self.assertEqual(sorted(r), [0x20b, 0x618])
        self.assertAlmostEqual(r[0x618], 6.0)
        self.assertAlmostEqual(r[0x20b], 1.0)

    def test_the_comparison_names_the_regions_that_cost_more_first(self):
        lines = ep.compare({1: 3.0, 2: 1.0}, {1: 1.0, 2: 1.5, 3: 0.5})
        self.assertIn("+1.0 µs in all, over 3 regions", lines[0])
        self.assertTrue(lines[1].strip().startswith("+2.00 µs  0x10000"))
        self.assertTrue(lines[-1].strip().startswith("-0.50 µs"))


if __name__ == "__main__":
    unittest.main()
