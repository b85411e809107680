"""The SLA profiler (`python -m tpserve.profile`): sweeps batch sizes to the memory limit, plots
throughput against latency, picks the operating point that meets the SLO and writes the server
flags for it (`launch/serve.py --operating-point FILE`)."""
