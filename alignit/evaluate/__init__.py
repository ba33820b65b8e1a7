"""Measure AlignIT on customized concepts: jobs, CustomConcept101's metrics, summary and report.

Host-free: images come from a generator behind the narrow protocol in ``generator.py``.
"""
