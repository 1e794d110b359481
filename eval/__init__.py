"""Evaluation tools for linvid: FVD (``eval.fvd``, ``eval.i3d``) and throughput measurement."""
