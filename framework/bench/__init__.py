"""``hydraserve bench``: open-loop load, per-config reports, sweeps and a recommended config.

``load`` sends requests on a schedule and measures from each one's intended send time; ``stats``
turns them into percentiles, throughput and goodput; ``workload`` says what is sent; ``report``
writes results.json, a markdown summary and plots; ``sweep`` compares the runs of a multirun;
``baselines`` measures plain FastAPI and stock LitServe in the same run; ``app`` ties them together.
"""
