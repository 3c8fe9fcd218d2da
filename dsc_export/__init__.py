"""dsc-export: dynamic split computing for ONNX image models.

Cut a model at its natural bottlenecks into head (device) and tail (server) subgraphs,
verify every cut numerically, and (in later stages) build engines, profile both sides and
plan the best split per batch size and data rate (Bakhtiarnia et al., *Dynamic Split
Computing for Efficient Deep Edge Intelligence*).
"""

__version__ = "0.1.0"
