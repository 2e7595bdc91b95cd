"""Tests of the training stack: flags, schedule, precision, ZeRO engines, end-to-end runs."""
