"""What a moemix model is, as data: widths (QuantSpec), which linears each architecture has and their roles,
the plan and its resolved per-module specs, their bytes, and the routing-profile format.

The lowest stage: planner, checkpoint, vLLM layers and server all read these; this package imports none of them.
"""
