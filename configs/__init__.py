"""Configuration and the runtime every linvid entry point shares.

The YAML tree in this folder is the only home of default values. The Python modules are
the bottom layer of the project, importable from every package:

* :mod:`configs.schema` — types and allowed values of every entry point's config;
* :mod:`configs.entry` — the Hydra entry-point decorator (checks the config before any work);
* :mod:`configs.processes` — process-group set-up under ``accelerate launch`` / torchrun;
* :mod:`configs.logs` — messages (stdlib logging, rank 0) and progress bars;
* :mod:`configs.files` — atomic file writes.
"""
