"""Data: the dataset registry, partitions, their cache, and a site's own data.

Used by the ClientApp (training data) and the ServerApp (test set). May import
only Flower's datasets stack and `dpfl_app.errors`; never strategy/, run/ or tools/.
"""
