"""Bench and test tools for evse-firmware, shipped apart from the firmware's wheel.

``evse_lab.csms``: a local OCPP 1.6J central system (``python -m evse_lab.csms``)
for the demo, the integration tests and the benchmarks.
"""
