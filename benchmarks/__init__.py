"""Side-by-side benchmarks of our MDP broker and majortomo's, with identical raw-frame peers.

`python -m benchmarks.run` runs every scenario and writes `benchmarks/RESULTS.md` and
`benchmarks/ratios.png`; `benchmarks/README.md` explains the method.
"""
