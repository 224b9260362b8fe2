"""dpfl_app: federated learning with user-level differential privacy on Flower."""
