"""Calibration and evaluation prompt sets (installed as the data package `dq_calib`)."""
