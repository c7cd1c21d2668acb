"""Speed and score-drift measurements, side by side in one run; figures in `benchmarks/RESULTS.md`.

A package, run from the repository's root as `python -m benchmarks.NAME [options]`, so that `qualiclip_hf`,
`training` and the other benchmarks import without path edits.
"""
