"""The experiment layer: everything the ``savae`` subcommands do, importable from a notebook.

Modules (each one concept; the library below knows nothing of them):

- ``settings``: every knob's default and the one type check of settings by name.
- ``builders``: model, loss, Optax optimizer, annealer and ES from settings.
- ``registry``: the compared methods (defaults, phases).
- ``compare``, ``train``, ``plateau``, ``dual_annealing``, ``benchmark``: the runs
  behind ``savae compare|train|plateau|dual-annealing|bench`` (each has ``main(argv)``).
- ``report``: statistics over seeds, summary tables, the HTML report, trace CSVs.
- ``figures``: learning curves, annealing traces, image grids (matplotlib imported lazily).
- ``workdir``: the output-folder policy (refuse, ``--resume``, ``--overwrite``), atomic CSV.
- ``flags``: command-line plumbing (help, model and scale-out flags, the mesh).
- ``problems``: the global-optimisation test functions; ``timing``: the benchmark's timers.

Nothing here is imported by ``import savae_jax``.
"""
