"""`xlp study`: several variants of one run on the same data (plan), run one after another (run),
and the report that compares them (report)."""
