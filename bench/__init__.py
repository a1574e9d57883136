"""A side-by-side benchmark: registry-cache against distribution's proxy mode (behind HAProxy).

Both run in the same process tree, against the same real upstream, alternating, so the ratios
compare like with like on whatever machine runs it. `python -m bench --help` says how.
"""
