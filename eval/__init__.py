"""Evaluation: FVD (``eval.fvd``), throughput benchmarks (``eval.throughput``), run comparison reports (``eval.report``)."""
