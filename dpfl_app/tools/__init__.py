"""Command-line tools around the app, all behind one command, `dpfl` (cli.py).

planning, sweeps, the privacy audit, baseline, loopback deployment, benchmarks. They drive the
app from outside (`flwr run`, or in process); nothing else imports tools/.
"""
