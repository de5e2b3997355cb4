"""``compress.py``: prune -> recover -> evaluate -> export -> report, as stages of one run folder.

``spec`` (what was asked, each stage's command line, running and resuming), ``stages`` (what each stage does
and records), ``report`` (``report.md``, ``results.json`` and the plots)."""
