"""`onebox loadtest`: simulated users against the router's chat completions, ramped up
step by step, to find how many users the box serves before it breaks.

workload.py (what each request asks) -> users.py (one keep-alive client per user, a
closed loop of streamed requests, each timed from its SSE chunks) -> runner.py (the
steps: 1, 2, 4 ... N users, each for a fixed time) -> stats.py (percentiles, tokens/s,
errors by kind, where it broke) -> report.py (the table, the JSON) and chart.py (PNG).
Nothing here reads the config or knows the router's address: the command
(daemons/ctl/loadtest_cmd.py) hands in a factory of HTTP clients.
"""
