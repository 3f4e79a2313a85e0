"""Transparent capture: a pod's traffic reaches its sidecar without the application knowing.

``podinit``: the nftables rules (``meshproxy pod-init``); ``original_dst``: where a captured
connection was going (``SO_ORIGINAL_DST``).
"""
