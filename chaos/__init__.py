"""Chaos-testing harness: real Redis servers, faults, and the scenarios that drive governors."""
