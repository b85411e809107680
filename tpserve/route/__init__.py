"""Routing requests between the target and a small model in one engine (`router.py`), the online
quality audit (`audit.py`), and `python -m tpserve.route calibrate` (`calibrate.py`)."""
