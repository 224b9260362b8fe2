"""The server's strategy: DP-FedAvg with adaptive clipping, reply screening, audit canaries.

Runs inside `flwr run` on the ServerApp. May import privacy/ and Flower;
never run/ or tools/.
"""
