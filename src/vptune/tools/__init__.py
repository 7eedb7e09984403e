"""Tools that read recorded runs, run as ``python -m vptune.tools.<name>``: the bench's table from recorded runs
(``bench_table``), how far a run's prompts moved (``prompt_motion``), a recorded run trained again from rescaled
prompts (``scaled_start``). Results they read live in ``results/`` at the repository's top, apart from the tools."""
