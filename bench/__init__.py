"""`make bench`: the proxy measured against a fake nginx upstream with wrk (see bench/run.py)."""
