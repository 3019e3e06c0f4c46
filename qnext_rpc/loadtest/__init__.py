"""`qnext-bench`: a load generator for any server implementing qnext.v1.Generation (it only speaks the proto).

workload.py  what to send (synthetic prompts with length distributions, or a JSONL dataset)
arrival.py   when to send it (fixed concurrency, or Poisson arrivals at a rate)
runner.py    one streaming request measured (TTFT, inter-token latencies, tokens, gRPC status), one load point
stats.py     percentiles, throughput, goodput under SLOs, errors by status code
report.py    the JSON result file, the printed summary and the PNG plots
cli.py       the command line
"""
